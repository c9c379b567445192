#!/usr/bin/env bash
# Creates ./.venv with granq_ao and everything the recipes and tests need (idempotent:
# reinstalls only when pyproject.toml or the constraints change). Usage: bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GRANQ_VENV:-.venv}
stamp="$VENV/.granq_setup_stamp"
want=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run installs torch; this takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q -c requirements/constraints.txt torch torchvision >&2
"$VENV/bin/python" -m pip install -q -c requirements/constraints.txt -e ".[all]" >&2
echo "$want" > "$stamp"
echo "[setup] done" >&2
