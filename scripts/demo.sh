#!/usr/bin/env bash
# The main job: install, fetch the real SmolLM2-135M, compress it with no data at all (it
# calibrates on text it writes itself), load it back, answer a question next to the original,
# and measure both models' perplexity on text every Python install ships (its own docs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
model=$(bash scripts/fetch_smollm2.sh)
budget=${BUDGET:-0.7}  # the smallest budget at which the compressed model still answers sensibly (README)
svdlora compress "$model" --budget "$budget" --submatrices 3 --output out/smollm2-svd --overwrite
python examples/generate.py out/smollm2-svd --baseline "$model" --prompt "What is the capital of France?"
python -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics.values()))" > out/python-docs.txt
svdlora eval out/smollm2-svd --baseline "$model" --task text-generation --data out/python-docs.txt \
    --limit 16 --max-length 512 --stride 512
