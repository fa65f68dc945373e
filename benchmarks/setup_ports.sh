#!/usr/bin/env bash
# Set up benchmarks/.env-ports: a separate environment holding the two public
# ports that bench_ports.py compares against. They are never dependencies of
# perceiver-ar itself.
#
#   perceiver-ar-pytorch 0.0.10  (needs einops)
#   perceiver-io 0.11.*          (its core model needs einops<0.5 and fairscale;
#                                 it declares Python <3.11, which only its
#                                 Lightning/Hugging Face extras need, so it is
#                                 installed with --ignore-requires-python)
#
# The CPU torch wheel is installed first and pinned so that pip never resolves
# an open-ended torch requirement to a multi-GB CUDA build; the ports then go
# in with --no-deps and only the dependencies their model code imports.
set -euo pipefail
cd "$(dirname "$0")"
ENV=.env-ports
PYTHON=${PYTHON:-python3}
test -x $ENV/bin/python || $PYTHON -m venv $ENV
PIP="$ENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0 numpy
$PIP install -q "einops>=0.4,<0.5"
$PIP install -q --no-deps "fairscale>=0.4,<0.5"
$PIP install -q --no-deps perceiver-ar-pytorch==0.0.10
$PIP install -q --no-deps --ignore-requires-python "perceiver-io==0.11.*"
$ENV/bin/python - <<'PY'
import importlib.metadata as md
import torch
from perceiver.model.core import CausalSequenceModel  # noqa: F401
from perceiver_ar_pytorch import PerceiverAR  # noqa: F401
print("ports ready:", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "perceiver-ar-pytorch", "perceiver-io", "einops", "fairscale")))
PY
