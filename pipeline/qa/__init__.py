"""Reconstruction QA of a latent output: `python -m pipeline qa CONFIG`.

Reads back the QA sample through `LatentDataset`, decodes it in Ray actors, scores PSNR/SSIM
(and LPIPS from local weights), checks the dataset's latent statistics against the configured
scaling/shift factors, and writes OUTPUT/qa/report.html and OUTPUT/qa/metrics.json.
`run_qa` returns the exit code: 0 pass, 1 fail, 2 QA could not run.
"""

from __future__ import annotations

from pipeline.qa.errors import QAError
from pipeline.qa.stage import QAStage, run_qa

__all__ = ["QAError", "QAStage", "run_qa"]
