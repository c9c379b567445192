#!/usr/bin/env bash
# The test suite (CPU only). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${GRANQ_VENV:-.venv}/bin/python" -m pytest "$@"
