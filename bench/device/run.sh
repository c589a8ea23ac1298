#!/usr/bin/env bash
# Issue 21's GPU checks in one run on the device machine; results under $OUT.
#
# Prepare here (CPU): build the benchmark cube and folds, then `python bench/device/pack.py`
# (writes .device/ and .whl/, ~56 MiB; it stops if they pass the 64 MiB the device tool
# carries). Run there with the device tool:
#   run(command="bash bench/device/run.sh", carry=[".device", ".whl"], timeout_s=540)
# Test here first, on the CPU and short: `DEVICE=cpu EPOCHS=2 SEEDS=0 bash bench/device/run.sh`.
#
# 1. batches ready for the model against the device-to-device copy rate (bench/streaming.py);
# 2. the 5-fold CV of train's defaults and of the original protocol, each seed timed and
#    scored, beside the original pipeline's anchors (bench/train_cv.py);
# 3. the compiled training step (bench/step_levers.py) and the defaults' CV compiled.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-device-results}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-0 1 2}
EPOCHS=${EPOCHS:-}
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the CV runs in .device/
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the CV runs in .device/
# the CVs' run folders go outside .device/, so a dry run here leaves nothing to carry there
# (set RUNS to keep them; a temporary folder is removed at the end)
if [ -z "${RUNS:-}" ]; then
    RUNS="$(mktemp -d)"
    trap 'rm -rf "$RUNS"' EXIT
fi
if [ -d .whl ] && [ "$DEVICE" != cpu ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi || true; "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } \
    > "$OUT/machine.txt" 2>&1
"$PY" bench/streaming.py --cube .device/cube.zarr --device "$DEVICE" \
    --results "$OUT/streaming_${DEVICE%%:*}.json" 2>&1 | tee "$OUT/streaming.log"
(
    cd .device
    "$PY" ../bench/train_cv.py --device "$DEVICE" --configs benchmark.yaml original.yaml \
        --seeds $SEEDS ${EPOCHS:+--epochs $EPOCHS} --output "$RUNS/runs" --results "$OUT/train_cv.json"
) 2>&1 | tee "$OUT/train_cv.log"
# 3. the training step under torch.compile against eager (compile time apart), then the
#    defaults' CV with train.compile: true (compile counted in its wall time)
"$PY" bench/step_levers.py --device "$DEVICE" --seconds 4 --repeats 2 --only eager compile \
    --results "$OUT/step_levers.json" 2>&1 | tee "$OUT/step_levers.log"
(
    cd .device
    "$PY" ../bench/train_cv.py --device "$DEVICE" --configs benchmark.yaml --seeds 0 \
        ${EPOCHS:+--epochs $EPOCHS} --train compile=true --output "$RUNS/runs-compiled" \
        --results "$OUT/train_cv_compiled.json"
) 2>&1 | tee "$OUT/train_cv_compiled.log"
