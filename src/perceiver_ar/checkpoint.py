"""Model directories: ``config.json`` + ``model.safetensors``, and the mixin that reads and writes them.

No pickle is ever loaded: weights go through safetensors, the config through
JSON, and a model is always rebuilt from its saved config. This module sits
below the model: ``PerceiverAR`` inherits ``save_pretrained`` and
``from_pretrained`` from ``Pretrained``, so neither imports the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PerceiverARConfig
from .files import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

ModelT = TypeVar("ModelT", bound="Pretrained")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A training run directory means its published ``model/``; anything else is taken as is."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file() and (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    return p


def save_model(model: torch.nn.Module, config: PerceiverARConfig, directory: str | os.PathLike) -> Path:
    """Write a model's config and weights; each file is replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return directory


def read_model_dir(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Path, PerceiverARConfig, dict[str, torch.Tensor]]:
    """The config and weights of a model directory (or a training run's ``model/``).

    A missing or unreadable file is a clear error; the weights are checked
    against the model by ``load_weights``.
    """
    directory = resolve_model_dir(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(written by save_pretrained)"
            )
    try:
        config = PerceiverARConfig.load(config_path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot read the model config {config_path}: {e}") from None
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
    return directory, config, state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Load ``state`` into ``model`` after checking names and shapes against it."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    where = f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}"
    if missing or unexpected:
        raise ValueError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for a module built from a ``PerceiverARConfig``."""

    config: PerceiverARConfig

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        return save_model(self, self.config, directory)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(
        cls: type[ModelT], directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> ModelT:
        """Rebuild a model from a directory written by ``save_pretrained`` (or a run directory)."""
        directory, config, state = read_model_dir(directory, map_location)
        model = cls(config)  # type: ignore[call-arg]
        load_weights(model, state, directory)  # type: ignore[arg-type]
        return model.to(map_location)  # type: ignore[attr-defined]
