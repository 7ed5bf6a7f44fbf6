#!/usr/bin/env bash
# One command from a fresh clone: set up, then train the quickstart job (GRPO, CPU, ~10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tidal train examples/quickstart.yaml "$@"
