#!/usr/bin/env bash
# The GPU benchmark, as one prepared script, sized for 8 minutes on one H200 (the last timed run,
# before the decode-stage, Ray Data and compiled channels-last steps were added, took about 6).
#
#   bash benchmarks/gpu.sh            (or: make bench-gpu)
#
# Prints: encoder images/s at 256 and 512 px for the `sd` preset in bf16, ours and diffusers';
# the fraction of the device's bf16 peak reached at 256 px; the end-to-end worker images/s
# with its efficiency ratio against the two stage limits (decoding in processes and in threads);
# peak device memory per batch size.
# Ray is not needed: the end-to-end figure is one EncodeWorker (the unit a Ray actor wraps)
# streaming real JPEG shards. Wheels missing on the machine may be put in .whl/ beforehand.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench-output/gpu}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# QUICK=1: fewer repeats and no compiled variant (about 2 minutes), for a short device slot.
R=10; PR=3; PS=512
if [ "${QUICK:-0}" = 1 ]; then R=4; PR=1; PS=256; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step() { echo; echo "### $*"; "$@" || echo "!!! step failed: $*"; }
step $PY -m benchmarks.bench_encoder --preset sd --resolution 256 --batch 32 --dtype bf16 --device cuda \
  --repeats $R --json "$OUTDIR/encoder256.json"
step $PY -m benchmarks.bench_encoder --preset sd --resolution 512 --batch 16 --dtype bf16 --device cuda \
  --repeats $R --json "$OUTDIR/encoder512.json"
step $PY -m benchmarks.device_peak --preset sd --resolution 256 --batch 64 --repeats $R --json "$OUTDIR/peak256.json"
[ "${QUICK:-0}" = 1 ] || step $PY -m benchmarks.device_peak --preset sd --resolution 256 --batch 64 --compile --json "$OUTDIR/peak256-compiled.json"
# Compiled in channels-last: eager channels-last was slower on the H200 (GroupNorm's NHWC kernel),
# but compiled, the norms are generated code and cuDNN gets its preferred layout.
[ "${QUICK:-0}" = 1 ] || step $PY -m benchmarks.device_peak --preset sd --resolution 256 --batch 64 --compile --channels-last \
  --json "$OUTDIR/peak256-compiled-cl.json"
# The decode stage alone: cost per image, and threads vs processes with 1, 4 and 14 decoders.
step $PY -m benchmarks.bench_decode --resolution 256 --source-sides 320 --images 512 --decoders 1,4,14 \
  --repeats $PR --workdir /tmp/bench-decode
# Decoding in threads and in processes (the default on a GPU), side by side in one run.
step $PY -m benchmarks.bench_pipeline --preset sd --resolution 256 --device cuda --dtype bf16 \
  --batch 64 --cpus 16 --decode-threads 14 --shards 4 --per-shard $PS --repeats $PR --no-job \
  --decode-mode processes,threads --concurrent-seconds 5 \
  --workdir /tmp/bench-pipeline --json "$OUTDIR/pipeline.json"
step $PY -m benchmarks.bench_memory --device cuda --preset sd --resolution 256 --dtype bf16
# Against the Ray Data way, where Ray (with Ray Data) is installed on the machine.
if $PY -c "import ray.data" >/dev/null 2>&1; then
  step $PY -m benchmarks.bench_raydata --preset sd --resolution 256 --device cuda --dtype bf16 --batch 64 \
    --cpus 16 --shards 4 --per-shard $PS --repeats $PR --workdir /tmp/bench-raydata --json "$OUTDIR/raydata.json"
else
  echo; echo "### bench_raydata skipped: Ray Data is not installed here"
fi
