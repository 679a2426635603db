#!/usr/bin/env bash
# The prepared device check (issue 26), for a bare machine with an NVIDIA GPU whose image has torch,
# transformers, pandas and matplotlib: installs what else mpsearch needs from wheels carried in .whl/ (see
# the device tool's README: pulp, ortools, optuna, highspy, gguf, ... as cp312 manylinux wheels) into
# /tmp/site, then runs experiments/gpu_check.py (8 minutes of budget by default; arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -c "import torch; print('{\"kind\": \"device\", \"cuda\": %s, \"name\": \"%s\"}' % (str(torch.cuda.is_available()).lower(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'))"
exec python3 experiments/gpu_check.py "$@"
