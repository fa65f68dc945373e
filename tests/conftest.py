"""Shared test set-up: quiet OpenMP, deterministic torch, small helpers."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from perceiver_ar import PerceiverAR, PerceiverARConfig  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

GOLDEN_DIR = Path(__file__).parent / "golden"


@pytest.fixture
def golden_dir() -> Path:
    return GOLDEN_DIR


def make_model(position_encoding="rotary", seed=0, **overrides):
    """A small random model with non-zero logits, in eval mode (shared by the model and generation tests)."""
    torch.manual_seed(seed)
    cfg = dict(
        context_len=32,
        num_latents=8,
        input_dim=24,
        latent_dim=16,
        num_latent_layers=2,
        cross_attend_heads=2,
        latent_heads=2,
        position_encoding=position_encoding,
        final_layer_init_zeros=False,  # zero logits would make every comparison trivial
    )
    cfg.update(overrides)
    return PerceiverAR(PerceiverARConfig(**cfg)).eval()


def tiny_train_config(data, out, **overrides):
    """A ``TrainConfig`` of a few quiet steps of the tiny preset: no evaluation, no progress bar, 1 thread."""
    from perceiver_ar.train import TrainConfig

    settings = dict(
        data=str(data),
        out=str(out),
        preset="tiny",
        steps=2,
        batch_size=2,
        eval_every=0,
        progress=False,
        tensorboard=False,
        threads=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
