#!/usr/bin/env bash
# The main job: zero-shot GranQ QAT of the CIFAR-10 ResNet-20 teacher at W4A4 (default settings).
# Extra arguments go to recipes/zsq_cifar.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${GRANQ_VENV:-.venv}/bin/python" recipes/zsq_cifar.py "$@"
