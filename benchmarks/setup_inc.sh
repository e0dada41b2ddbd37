#!/usr/bin/env bash
# Make benchmarks/.venv-inc: a virtual environment with Intel Neural Compressor 3.7.1 (the last
# release that has its pruner) for bench_quality.py's optional INC arm.
#
# INC 3.7.1 needs numpy<2, which the main environment does not have, hence a venv of its own. The
# benchmark runs the INC arm in this venv as a subprocess with the repository on PYTHONPATH, so the
# repository itself is not installed here, only what its task code imports. INC 3.7.1 imports
# pkg_resources at start-up, which setuptools 81 removed, hence setuptools<81, and imports six
# without declaring it.
#
# Usage: bash benchmarks/setup_inc.sh            (PYTHON=python3.11 TORCH="torch==2.5.1" to override)
# torch: TORCH if given; else, when the main interpreter has a CUDA build of torch, the same version
# (a user's GPU torch is respected); else torch==2.13.0 (a CPU build on CPU-only machines).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-inc"
python="${PYTHON:-python3}"

if [[ -z "${TORCH:-}" ]]; then
    # Prints "torch==X.Y.Z" for a CUDA build in the main interpreter, nothing otherwise.
    TORCH="$("$python" - <<'EOF' 2>/dev/null || true
import torch
if torch.version.cuda:
    print("torch==" + torch.__version__.split("+")[0])
EOF
)"
    TORCH="${TORCH:-torch==2.13.0}"
fi

echo "setup_inc: venv $venv, interpreter $("$python" --version 2>&1), $TORCH"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install \
    "neural-compressor==3.7.1" \
    "numpy<2" \
    "setuptools<81" "six" \
    "$TORCH" \
    "lightning>=2.2" "torchmetrics>=1.0" "omegaconf>=2.3" "jsonargparse[signatures]>=4.27" \
    "matplotlib>=3.5" "rich>=13" "scikit-learn>=1.2"

# The check the benchmark makes before it runs the arm: INC's pruning API imports.
"$venv/bin/python" -c "
import neural_compressor, numpy, torch
from neural_compressor.training import WeightPruningConfig, prepare_pruning
print('setup_inc: ok: neural_compressor', neural_compressor.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)
"
