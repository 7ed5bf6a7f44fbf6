#!/usr/bin/env bash
# The test suite: lint, then every CPU test (GPU tests carry the `gpu` marker and are deselected).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check tidal tests benchmarks examples
exec .venv/bin/python -m pytest -q -ra "$@"
