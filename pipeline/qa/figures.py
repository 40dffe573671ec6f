"""The report's pictures: sample rows (original | reconstruction | error), PSNR and latent histograms."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from pipeline.qa import plots
from pipeline.qa.decoder import Reconstruction
from pipeline.qa.document import Findings, pick_groups
from pipeline.qa.metrics import error_map
from pipeline.qa.report import ReportFigures, SampleFigure

__all__ = ["build_figures"]


def build_figures(f: Findings, reconstructions: dict[tuple[str, str], Reconstruction]) -> ReportFigures:
    """Figures of the findings; `reconstructions` ((shard, key) -> images) of the grouped samples."""
    scores = f.scores
    figures = ReportFigures()
    # A sample's index in metrics.json's "samples" links its figure to its numbers.
    position = {(s.shard, s.key): i for i, s in enumerate(scores)}
    figures.colorbar = plots.png_data_uri(plots.colorbar())
    for group, items in pick_groups(scores).items():
        row = []
        for s in items:
            r = reconstructions.get((s.shard, s.key))
            if r is None:
                continue
            row.append(SampleFigure(
                index=position[(s.shard, s.key)],
                original=plots.png_data_uri(plots.upscale(Image.fromarray(r.original))),
                reconstruction=plots.png_data_uri(plots.upscale(Image.fromarray(r.reconstruction))),
                error=plots.png_data_uri(plots.upscale(plots.colorize(error_map(r.original, r.reconstruction)))),
            ))
        if row:
            figures.groups[group] = row
    psnrs = [s.psnr for s in scores if s.psnr is not None]
    if psnrs:
        figures.psnr_histogram = plots.png_data_uri(plots.value_histogram(
            psnrs, f"PSNR of {len(psnrs)} QA samples", "PSNR (dB)", markers=[(f.qa.min_psnr, "min_psnr")]))
    if f.histogram is not None and f.stats is not None:
        figures.channel_histograms = plots.png_data_uri(_channel_grid(f.histogram, f.stats.histogram_ranges()))
    return figures


def _channel_grid(histogram: np.ndarray, ranges: list[tuple[float, float]], columns: int = 4) -> Image.Image:
    """Small multiples: one value histogram per latent channel."""
    cell = (280, 170)
    channels = histogram.shape[0]
    cols = min(columns, channels)
    rows = math.ceil(channels / cols)
    sheet = Image.new("RGB", (cell[0] * cols, cell[1] * rows), (255, 255, 255))
    for c in range(channels):
        lo, hi = ranges[c]
        edges = np.linspace(lo, hi, histogram.shape[1] + 1).tolist()
        chart = plots.bar_histogram(histogram[c].tolist(), edges, f"channel {c}", "raw latent value", size=cell)
        sheet.paste(chart, ((c % cols) * cell[0], (c // cols) * cell[1]))
    return sheet
