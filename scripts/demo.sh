#!/usr/bin/env bash
# The main job: install, fetch the real SmolLM2-135M, compress it with no data at all (it
# calibrates on text it writes itself), load it back, answer a question next to the original,
# and measure both models' perplexity on text every Python install ships (its own docs).
#
# The recipe is the smallest that still answers sensibly (README, BENCHMARKS.md sections 8-9): two
# residual stages, the whole matrix in int4 (group 128) and a low-rank int8 stage repairing its
# rounding error, at 4.5 bits per original weight: budget 4.5/32 of the float32 matrices' bytes.
# RECIPE=lowrank runs the pure low-rank one instead (pivoted factors at budget 0.7 of the parameters).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
model=$(bash scripts/fetch_smollm2.sh)
if [ "${RECIPE:-int4}" = lowrank ]; then
    recipe=(--budget "${BUDGET:-0.7}" --submatrices 3)
else
    recipe=(--budget "${BUDGET:-0.140625}" --submatrices 2 --stage-dtypes full-int4,int8)
fi
svdlora compress "$model" "${recipe[@]}" --output out/smollm2-svd --overwrite
python examples/generate.py out/smollm2-svd --baseline "$model" --prompt "What is the capital of France?"
python -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics.values()))" > out/python-docs.txt
svdlora eval out/smollm2-svd --baseline "$model" --task text-generation --data out/python-docs.txt \
    --limit 16 --max-length 512 --stride 512
