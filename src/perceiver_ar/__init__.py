"""Perceiver AR in PyTorch: long-context autoregressive modelling.

from perceiver_ar import PerceiverAR, PerceiverARConfig
model = PerceiverAR(PerceiverARConfig.from_preset("tiny"))
logits = model(torch.randint(3, 259, (2, 64))).logits  # [2, 16, 259]
"""

import os

# OpenMP threads that spin while waiting make small CPU steps many times
# slower whenever anything else runs. The policy is read when torch starts, so
# it is set here and only here: this file runs before any module of the
# package imports torch (the CLI included). A value the user exported wins,
# and it has no effect if torch was imported before perceiver_ar.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import PRESETS, PerceiverARConfig
from .convert import from_official
from .generate import GenerationOutput, GenerationStep, generate, generate_stream
from .loss import LossOutput, perceiver_ar_loss, shift_events
from .model import PerceiverAR, PerceiverAROutput
from .vocab import EOS_ID, PAD_ID, SOS_ID, TOKEN_OFFSET

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "PRESETS",
    "SOS_ID",
    "TOKEN_OFFSET",
    "LossOutput",
    "PerceiverAR",
    "PerceiverARConfig",
    "PerceiverAROutput",
    "GenerationOutput",
    "GenerationStep",
    "from_official",
    "generate",
    "generate_stream",
    "perceiver_ar_loss",
    "shift_events",
]
__version__ = "0.1.0"
