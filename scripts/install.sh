#!/usr/bin/env bash
# Install svdlora with its test/benchmark extras. torch is pinned exactly: a looser spec
# would pull the multi-GB CUDA build where only the CPU wheel is wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
