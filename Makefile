# Everything a fresh machine needs: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
# CPU-only machines get the CPU wheel of torch first; a bare `torch` requirement would pull a CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo demo-s3 test lint bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PYTHON) -m pip install -q $(TORCH_CPU); fi
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PYTHON) -m pipeline make-shards --sample --out demo-shards --shards 4 --per-shard 64
	$(PYTHON) -m pipeline run configs/demo.yaml
	@echo "QA report: demo-output/qa/report.html"

demo-s3: install
	$(PYTHON) -m pipeline.demo_s3

test: install
	$(BIN)/pytest -q -p no:cacheprovider tests

lint: install
	$(BIN)/ruff check latentae pipeline tests benchmarks

bench: install
	$(PYTHON) -m benchmarks.run

bench-gpu:
	bash benchmarks/gpu.sh

clean:
	rm -rf demo-output demo-shards bench-output
