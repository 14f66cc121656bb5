#!/usr/bin/env bash
# The test command of the README (and of CI): install, then the fast test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
HF_HUB_OFFLINE=1 python -m pytest -q
