"""The QA report: one self-contained HTML page rendered from the metrics.json document.

Every number on the page is read from the metrics document at render time and its table cell
carries the JSON pointer (RFC 6901) of its source in `data-key`, so the page and metrics.json
cannot disagree and a machine can check that they do not. Figures are embedded as PNG data
URIs: the file can be mailed, attached to a CI run or opened from object storage as it is.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from string import Template
from typing import Any

#: Metric rows of the summary tables: (metric key, label, higher is better).
METRIC_ROWS = (
    ("psnr", "PSNR (dB)", True),
    ("ssim", "SSIM", True),
    ("lpips", "LPIPS", False),
)
SUMMARY_COLUMNS = ("count", "mean", "median", "p5", "worst", "best")
#: Shards listed in the per-shard table of the page (metrics.json lists them all).
MAX_SHARD_ROWS = 30


@dataclass
class SampleFigure:
    """The three panels of one sample row, as data URIs, and where its numbers are in metrics.json."""

    index: int  # position in metrics["samples"]
    original: str
    reconstruction: str
    error: str


@dataclass
class ReportFigures:
    """All embedded images of the report (PNG data URIs)."""

    psnr_histogram: str | None = None
    channel_histograms: str | None = None
    colorbar: str | None = None
    groups: dict[str, list[SampleFigure]] = field(default_factory=dict)


def format_number(value: Any) -> str:
    """How a number from metrics.json is written on the page (also used by the tests)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.5g}"
    return str(value)


def pointer(*parts: Any) -> str:
    """JSON pointer to metrics[parts[0]][parts[1]]..."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve(document: Any, ptr: str) -> Any:
    """Value at a JSON pointer inside `document`."""
    node = document
    for raw in ptr.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


class _Page:
    """Small HTML builder bound to the metrics document."""

    def __init__(self, metrics: dict):
        self.m = metrics

    def val(self, *parts: Any, css: str = "") -> str:
        """A cell showing metrics[parts...], tagged with its JSON pointer."""
        ptr = pointer(*parts)
        value = resolve(self.m, ptr)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        cls = " ".join(c for c in ("num" if numeric else "", css) if c)
        attr = f' class="{cls}"' if cls else ""
        return f'<td{attr} data-key="{html.escape(ptr)}">{html.escape(format_number(value))}</td>'

    @staticmethod
    def text(value: Any, css: str = "") -> str:
        attr = f' class="{css}"' if css else ""
        return f"<td{attr}>{html.escape(str(value))}</td>"

    @staticmethod
    def table(header: list[str], rows: list[str], css: str = "") -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        attr = f' class="{css}"' if css else ""
        return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    @staticmethod
    def row(cells: list[str], css: str = "") -> str:
        attr = f' class="{css}"' if css else ""
        return f"<tr{attr}>{''.join(cells)}</tr>"


def _checks(p: _Page) -> str:
    rows = []
    for i, check in enumerate(p.m["checks"]):
        status = check["status"]
        rows.append(p.row([
            p.val("checks", i, "name"),
            p.val("checks", i, "status", css=f"status {status}"),
            p.val("checks", i, "value"),
            p.val("checks", i, "rule"),
            p.val("checks", i, "message"),
        ], status if status != "pass" else ""))
    return p.table(["check", "status", "value", "rule", "details"], rows)


def _provenance(p: _Page) -> str:
    prov = p.m["provenance"]
    model = prov.get("model") or {}
    decoder = prov.get("decoder") or {}
    items = [
        ("output", p.m["output"]),
        ("manifest fingerprint (sha256)", prov.get("manifest_fingerprint")),
        ("encoder model", f"preset {model.get('preset')}, weights sha256 {model.get('weights_sha256') or 'none (random init)'}"),
        ("decoder used by QA", f"preset {decoder.get('preset')}, weights sha256 "
                               f"{decoder.get('weights_sha256') or 'none (random init)'}, "
                               f"{decoder.get('dtype')} on {decoder.get('device')}"),
        ("decoder matches manifest model", "yes" if prov.get("decoder_matches_manifest") else "NO"),
        ("latent storage", f"{prov.get('format')} · {prov.get('dtype')} · store {prov.get('store')}"),
        ("latent shapes", ", ".join("x".join(str(v) for v in s) for s in prov.get("shapes") or [])),
        ("code version (encode)", prov.get("manifest_code_version")),
        ("code version (QA)", prov.get("qa_code_version")),
        ("manifest created", prov.get("manifest_created")),
    ]
    rows = [p.row([p.text(k), p.text(v if v is not None else "–")]) for k, v in items]
    config = html.escape(json.dumps(prov.get("config"), indent=2, sort_keys=True))
    return (p.table(["", ""], rows)
            + f"<details><summary>job configuration (secrets masked)</summary><pre>{config}</pre></details>")


def _counts(p: _Page) -> str:
    c = p.m["counts"]
    rows = [
        p.row([p.text("shards committed"), p.val("counts", "shards_committed")]),
        p.row([p.text("shards failed (summary.json)"), p.val("counts", "shards_failed_count")],
              "fail" if c["shards_failed_count"] else ""),
        p.row([p.text("images with latents"), p.val("counts", "images")]),
        p.row([p.text("images rejected (ledgers)"), p.val("counts", "errors")]),
        p.row([p.text("rejected as non-finite (NaN/Inf, ledgers)"), p.val("counts", "finite", "non_finite")]),
        p.row([p.text("last encode run: NaN/Inf in fp16/bf16, encoded again in fp32"),
               p.val("counts", "finite", "fp32_retries")]),
        p.row([p.text("last encode run: finite in fp32 and stored"), p.val("counts", "finite", "fp32_recovered")]),
        p.row([p.text("QA side-table rows"), p.val("counts", "qa_side_rows")]),
        p.row([p.text("QA samples scored"), p.val("counts", "qa_scored")]),
        p.row([p.text("QA samples with problems"), p.val("counts", "qa_problem_count")],
              "fail" if c["qa_problem_count"] else ""),
    ]
    tp = c.get("throughput")
    if tp:
        for k in sorted(tp):
            if isinstance(tp[k], (int, float)) and not isinstance(tp[k], bool):
                rows.append(p.row([p.text(f"last encode run: {k.replace('_', ' ')}"),
                                   p.val("counts", "throughput", k)]))
    out = p.table(["", "count"], rows)
    if c["errors_by_reason"]:
        erows = []
        for i, r in enumerate(c["errors_by_reason"]):
            examples = "; ".join(f"{e['shard']}/{e['key']}: {e['message']}" for e in r["examples"])
            erows.append(p.row([p.val("counts", "errors_by_reason", i, "stage"),
                                p.val("counts", "errors_by_reason", i, "error"),
                                p.val("counts", "errors_by_reason", i, "count"),
                                p.text(examples)]))
        out += "<h3>Rejected images by reason</h3>" + p.table(["stage", "error", "count", "examples"], erows)
    if c["shards_failed"]:
        frows = [p.row([p.val("counts", "shards_failed", i, "name"), p.text(f.get("error", ""))], "fail")
                 for i, f in enumerate(c["shards_failed"])]
        out += "<h3>Failed shards</h3>" + p.table(["shard", "error"], frows)
    if c["qa_problems"]:
        qrows = [p.row([p.val("counts", "qa_problems", i, "shard"), p.val("counts", "qa_problems", i, "key"),
                        p.text(q["problem"])], "fail") for i, q in enumerate(c["qa_problems"][:50])]
        more = len(c["qa_problems"]) - 50
        out += "<h3>QA samples with problems</h3>" + p.table(["shard", "key", "problem"], qrows)
        if more > 0:
            out += f'<p class="note">… and {more} more (all in metrics.json)</p>'
    return out


def _summary_rows(p: _Page, base: tuple, label_prefix: str = "") -> list[str]:
    rows = []
    block = resolve(p.m, pointer(*base))
    for key, label, _ in METRIC_ROWS:
        if block.get(key) is None:
            continue
        rows.append(p.row([p.text(label_prefix + label)] + [p.val(*base, key, col) for col in SUMMARY_COLUMNS]))
    return rows


def _metrics(p: _Page) -> str:
    m = p.m["metrics"]
    lp = p.m["lpips"]
    note = ("LPIPS on (AlexNet, local weights)." if lp["enabled"]
            else f"LPIPS off: {html.escape(lp['reason'])}.")
    out = (f'<p class="note">Reconstructions of the stored latents, read back through LatentDataset, decoded and '
           f'rounded to 8 bits, against the preprocessed originals. <b>p5</b>: the value the worst 5% of images '
           f'lie beyond (5th percentile; 95th for LPIPS). {note}</p>')
    header = ["metric", *SUMMARY_COLUMNS]
    out += p.table(header, _summary_rows(p, ("metrics", "overall")))
    if m["by_bucket"]:
        rows = []
        for bucket in m["by_bucket"]:
            rows += _summary_rows(p, ("metrics", "by_bucket", bucket), f"{bucket} · ")
        out += "<h3>By bucket (height x width)</h3>" + p.table(["bucket · metric", *SUMMARY_COLUMNS], rows)
    if m["by_shard"]:
        # Worst shards first (by mean PSNR); a long run lists only the worst, metrics.json has all.
        def mean_psnr(shard: str) -> float:
            value = m["by_shard"][shard]["psnr"]["mean"]
            return -math.inf if value is None else value

        shards = sorted(m["by_shard"], key=lambda name: (mean_psnr(name), name))
        rows = []
        for shard in shards[:MAX_SHARD_ROWS]:
            rows += _summary_rows(p, ("metrics", "by_shard", shard), f"{shard} · ")
        title = "By shard, worst first" + (f" (the {MAX_SHARD_ROWS} worst of {len(shards)})"
                                           if len(shards) > MAX_SHARD_ROWS else "")
        out += f"<h3>{title}</h3>" + p.table(["shard · metric", *SUMMARY_COLUMNS], rows)
    return out


def _storage(p: _Page) -> str:
    s = p.m["storage"]
    out = (f'<p class="note">What storing latents as <b>{html.escape(str(s["dtype"]))}</b> costs: the same sample '
           f'decoded from the fp32 posterior mean kept before rounding. PSNR lost = PSNR(fp32) − PSNR(stored); '
           f'negative values are noise. Stored latents must equal the fp32 ones up to {html.escape(str(s["dtype"]))} '
           f'rounding (relative {format_number(s["rtol"])}).</p>')
    rows = []
    for key, label in (("psnr_fp32", "PSNR from fp32 latents (dB)"),
                       ("psnr_bf16", "PSNR from the fp32 latents rounded to bf16 (dB)"),
                       ("psnr_stored", "PSNR from stored latents (dB)"),
                       ("psnr_lost_db", "PSNR lost to storage (dB)"),
                       ("psnr_lost_vs_bf16_db", "PSNR lost against bf16 storage (dB)"),
                       ("decoded_psnr", "decoded stored vs decoded fp32 (dB)"),
                       ("latent_psnr", "stored vs fp32 latents (dB, peak = latent range)")):
        if s.get(key) is None:
            continue  # the bf16 rows: only for dtypes smaller than bf16 (fp8)
        rows.append(p.row([p.text(label)] + [p.val("storage", key, col) for col in SUMMARY_COLUMNS]))
    out += p.table(["quantity", *SUMMARY_COLUMNS], rows)
    rows = [
        p.row([p.text("max relative latent error"), p.val("storage", "max_rel_error")]),
        p.row([p.text("samples beyond rounding tolerance"), p.val("storage", "beyond_rounding")],
              "fail" if s["beyond_rounding"] else ""),
    ]
    return out + p.table(["", ""], rows)


def _samples(p: _Page, figures: ReportFigures) -> str:
    if not figures.groups:
        return '<p class="note">No sample could be decoded.</p>'
    out = ""
    if figures.colorbar:
        out += (f'<p class="note">Error heat map: mean absolute error over RGB in 8-bit levels. '
                f'<img alt="error colour scale" src="{figures.colorbar}"></p>')
    for group, items in figures.groups.items():
        rows = []
        for fig in items:
            i = fig.index
            sample = p.m["samples"][i]
            caption = f"{sample['shard']}/{sample['key']} · {sample['bucket']}"
            rows.append(p.row([
                p.text(caption),
                p.val("samples", i, "psnr"),
                p.val("samples", i, "ssim"),
                f'<td><img alt="original {html.escape(sample["key"])}" src="{fig.original}"></td>',
                f'<td><img alt="reconstruction {html.escape(sample["key"])}" src="{fig.reconstruction}"></td>',
                f'<td><img alt="error {html.escape(sample["key"])}" src="{fig.error}"></td>',
            ]))
        out += f"<h3>{html.escape(group)}</h3>" + p.table(
            ["sample", "PSNR", "SSIM", "original", "reconstruction", "error"], rows, "grid")
    return out


def _histograms(p: _Page, figures: ReportFigures) -> str:
    out = '<div class="figs">'
    if figures.psnr_histogram:
        out += f'<img alt="PSNR histogram" src="{figures.psnr_histogram}">'
    if figures.channel_histograms:
        out += f'<img alt="per-channel latent histograms" src="{figures.channel_histograms}">'
    out += "</div>"
    return out + ('<p class="note">Latent value histograms are over the QA sample (stored latents, raw); '
                  'the red line in the PSNR histogram is qa.min_psnr.</p>')


def _statistics(p: _Page) -> str:
    st = p.m["latent_stats"]
    if st is None:
        return '<p class="note">No commit record holds latent statistics.</p>'
    cols = ("count", "mean", "std", "min", "max", "nan", "inf", "recommended_scaling_factor")
    rows = []
    for i, ch in enumerate(st["channels"]):
        bad = "fail" if ch["nan"] or ch["inf"] else ""
        rows.append(p.row([p.val("latent_stats", "channels", i, c) for c in ("channel", *cols)], bad))
    rows.append(p.row([p.text("all")] + [p.val("latent_stats", "overall", c) for c in cols[:-1]]
                      + [p.val("latent_stats", "recommended_scaling_factor")]))
    out = (f'<p class="note">Exact, over every stored latent of the {st["shards"]} committed shards (from the commit '
           f'records); raw latents, before scaling.</p>')
    out += p.table(["channel", "count", "mean", "std", "min", "max", "NaN", "Inf", "1/std"], rows)
    frows = [
        p.row([p.text("scaling factor"), p.val("latent_stats", "configured_scaling_factor"),
               p.val("latent_stats", "recommended_scaling_factor"), p.val("latent_stats", "scale_drift"),
               p.text("ok" if st["scale_ok"] else "beyond tolerance", "pass" if st["scale_ok"] else "fail")]),
        p.row([p.text("shift factor"), p.val("latent_stats", "configured_shift_factor"),
               p.val("latent_stats", "recommended_shift_factor"), p.val("latent_stats", "shift_drift"),
               p.text("ok" if st["shift_ok"] else "beyond tolerance", "pass" if st["shift_ok"] else "fail")]),
    ]
    out += "<h3>Scaling and shift</h3>" + p.table(["", "configured", "recommended", "drift", "status"], frows)
    srows = [
        p.row([p.text("mean of (z − shift)·scale (target 0)"), p.val("latent_stats", "scaled_mean")]),
        p.row([p.text("std of (z − shift)·scale (target 1)"), p.val("latent_stats", "scaled_std")]),
        p.row([p.text("tolerance (qa.stats_tolerance)"), p.val("latent_stats", "tolerance")]),
    ]
    out += p.table(["with the configured factors", ""], srows)
    out += ('<p class="note">Recommended: scale = 1/std, shift = mean, pooled over channels, so that '
            '(z − shift)·scale has mean 0 and std 1. Drift: |std·scale − 1| for the scale, |mean − shift|/std '
            'for the shift; tolerance is qa.stats_tolerance.</p>')
    return out


def _text_statistics(p: _Page) -> str:
    st = p.m.get("text_stats")
    if st is None:
        return ""
    out = "<h2>Caption embeddings</h2>"
    out += ('<p class="note">Over the QA sample, read back through LatentDataset as training reads them; '
            'stored values.</p>')
    cols = ("rows", "count", "mean", "std", "min", "max", "nan", "inf")
    rows = [p.row([p.text(name)] + [p.val("text_stats", "columns", name, c) for c in cols],
                  "fail" if c["nan"] or c["inf"] else "")
            for name, c in st["columns"].items()]
    out += p.table(["column", "rows", "values", "mean", "std", "min", "max", "NaN", "Inf"], rows)
    tcols = ("rows", "mean", "min", "max", "max_length", "at_max_length")
    trows = [p.row([p.text(name)] + [p.val("text_stats", "tokens", name, c) for c in tcols])
             for name in st["tokens"]]
    out += "<h3>Tokens per caption</h3>" + p.table(
        ["encoder", "rows", "mean", "min", "max", "max_length", "at max_length (possibly truncated)"], trows)
    return out


def render_report(metrics: dict, figures: ReportFigures) -> str:
    """The report page for a metrics document and its figures."""
    p = _Page(metrics)
    template = Template(resources.files("pipeline").joinpath("templates/report.html").read_text("utf-8"))
    passed = metrics["verdict"] == "pass"
    return template.substitute(
        output=html.escape(metrics["output"]),
        generated=html.escape(metrics["generated"]),
        verdict_class="pass" if passed else "fail",
        verdict_text="PASS" if passed else "FAIL",
        checks=_checks(p),
        provenance=_provenance(p),
        counts=_counts(p),
        metrics=_metrics(p),
        storage=_storage(p),
        samples=_samples(p, figures),
        histograms=_histograms(p, figures),
        statistics=_statistics(p) + _text_statistics(p),
    )
