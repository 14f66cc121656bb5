#!/usr/bin/env bash
# The main job: install, fetch the real SmolLM2-135M, compress it at budget 0.5 with
# 3 submatrices (summary table printed), load it back and generate text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
model=$(bash scripts/fetch_smollm2.sh)
svdlora compress "$model" --budget 0.5 --submatrices 3 --output out/smollm2-svd --overwrite
python examples/generate.py out/smollm2-svd --baseline "$model" --prompt "What is the capital of France?"
