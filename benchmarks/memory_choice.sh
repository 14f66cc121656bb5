#!/bin/bash
# The CLI's own choice to stream a calibrated run (svdlora/cli/memory_choice.py), end to end:
# the same `svdlora compress` command in memory without a limit, then under `ulimit -v` (no
# --stream), weight files compared; plain SVD under the same limit, which fits, stays in memory.
#
#   bash benchmarks/memory_choice.sh MODEL_FOLDER CALIBRATION_TEXT WORKDIR [LIMIT_KB]
#   e.g. bash benchmarks/memory_choice.sh ~/.cache/svdlora/SmolLM2-135M wikitext-2.valid.txt /tmp/mc 3500000
set -u
if [ $# -lt 3 ]; then
    echo "usage: bash benchmarks/memory_choice.sh MODEL_FOLDER CALIBRATION_TEXT WORKDIR [LIMIT_KB]" >&2
    exit 2
fi
MODEL=$1 DATA=$2 WORK=$3 LIMIT=${4:-3500000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS="--budget 0.5 --calibration $DATA --calibration-samples 8 --calibration-length 128 --no-progress"
mkdir -p "$WORK" && rm -rf "$WORK/in-memory" "$WORK/limited" "$WORK/plain"
show() { grep -E "streaming it instead|^wrote|warning|error" || true; }
/usr/bin/time -f "in memory, no limit: %e s, max RSS %M KB" \
    python3 -m svdlora compress "$MODEL" $ARGS -o "$WORK/in-memory" 2>&1 | show
( ulimit -v "$LIMIT"; /usr/bin/time -f "ulimit -v $LIMIT, no --stream: %e s, max RSS %M KB" \
    python3 -m svdlora compress "$MODEL" $ARGS -o "$WORK/limited" 2>&1 | show )
( ulimit -v "$LIMIT"; /usr/bin/time -f "plain SVD, ulimit -v $LIMIT: %e s, max RSS %M KB" \
    python3 -m svdlora compress "$MODEL" --budget 0.5 --calibration none --no-progress -o "$WORK/plain" 2>&1 | show )
if cmp -s "$WORK/in-memory/model.safetensors" "$WORK/limited/model.safetensors"; then
    echo "weight files, in memory vs limited: identical"
else
    echo "weight files, in memory vs limited: DIFFER"
fi
