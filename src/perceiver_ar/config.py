"""The model config: one flat dataclass with derived fields and named presets.

A model is always rebuilt from its saved config (``config.json`` beside the
weights), never from command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSITION_ENCODINGS = ("rotary", "absolute")
ABSOLUTE_TABLES = ("learned", "sinusoidal")
ACTIVATIONS = ("sq_relu", "gelu")
CROSS_ATTEND_DROPOUT_MODES = ("mask", "drop")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class PerceiverARConfig:
    """Hyper-parameters of a Perceiver AR model.

    Paper notation: N = ``context_len``, M = ``num_latents``, E = ``input_dim``,
    D = ``latent_dim``, L = ``num_latent_layers``.
    """

    vocab_size: int = 259
    context_len: int = 1024  # N: the longest input the model accepts
    num_latents: int = 256  # M: latents sit on the last M valid inputs
    input_dim: int = 256  # E: width of the token embedding and cross-attend q/k/v
    latent_dim: int = 256  # D: width of the latents
    num_latent_layers: int = 4  # L: causal self-attention layers over the latents
    cross_attend_heads: int = 4
    latent_heads: int = 4
    cross_attend_widening: int = 4  # MLP hidden = widening * D in the cross-attend
    latent_widening: int = 4
    activation: str = "sq_relu"  # "sq_relu" (official default) or "gelu" (tanh form)
    dropout: float = 0.0  # on attention and MLP outputs, before each residual
    cross_attend_dropout: float = 0.0  # rate of input keys hidden from the latents
    cross_attend_dropout_mode: str = "mask"  # "mask" (official) or "drop" (saves compute)
    latent_dropout: float = 0.0  # rate of latents hidden as keys in the latent layers
    position_encoding: str = "rotary"  # "rotary" or "absolute"
    rotary_fraction: float = 0.5  # share of each head's channels that rotate
    max_wavelength: int | None = None  # rotary base; None means context_len
    absolute_table: str = "learned"  # "learned" or "sinusoidal" (absolute only)
    # Rows of each absolute position table; one table per index axis, summed
    # (images use one per row/column/channel). Empty means (context_len + 1,).
    position_table_sizes: tuple[int, ...] = field(default_factory=tuple)
    z_loss: float = 1e-4
    final_layer_init_zeros: bool = True
    layer_norm_eps: float = 1e-5
    # Memory controls for long contexts: the cross-attend runs in query chunks
    # of this many latents (0 = one chunk), activations can be recomputed in
    # the backward pass.
    cross_attend_chunk_size: int = 0
    checkpoint_cross_attend: bool = False
    checkpoint_latent_layers: bool = False

    def __post_init__(self) -> None:
        self.check_types()
        self.position_table_sizes = tuple(int(s) for s in self.position_table_sizes)
        if self.max_wavelength is None:
            self.max_wavelength = self.context_len
        if not self.position_table_sizes:
            self.position_table_sizes = (self.context_len + 1,)
        self.validate()

    def check_types(self) -> None:
        """Refuse a field of the wrong kind (``num_latents=2.5``, ``dropout="x"``) before it is used."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "position_table_sizes":
                ok = isinstance(value, list | tuple) and all(_is_int(v) for v in value)
                kind = "a list of integers"
            elif f.name == "max_wavelength":
                ok, kind = value is None or _is_int(value), "an integer (or null)"
            elif f.type in ("int", int):
                ok, kind = _is_int(value), "an integer"
            elif f.type in ("float", float):
                ok, kind = _is_number(value), "a finite number"
            elif f.type in ("bool", bool):
                ok, kind = isinstance(value, bool), "true or false"
            elif f.type in ("str", str):
                ok, kind = isinstance(value, str), "a string"
            else:
                continue
            if not ok:
                raise ValueError(f"invalid PerceiverARConfig: {f.name} must be {kind}, got {value!r}")

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid PerceiverARConfig: {msg}")

        for name in (
            "vocab_size",
            "context_len",
            "num_latents",
            "input_dim",
            "latent_dim",
            "cross_attend_heads",
            "latent_heads",
            "cross_attend_widening",
            "latent_widening",
        ):
            if int(getattr(self, name)) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_latent_layers < 0:
            fail(f"num_latent_layers must be >= 0, got {self.num_latent_layers}")
        if self.num_latents > self.context_len:
            fail(f"num_latents ({self.num_latents}) cannot exceed context_len ({self.context_len})")
        if self.input_dim % self.cross_attend_heads:
            fail(
                f"input_dim ({self.input_dim}) must be divisible by "
                f"cross_attend_heads ({self.cross_attend_heads})"
            )
        if self.latent_dim % self.latent_heads:
            fail(f"latent_dim ({self.latent_dim}) must be divisible by latent_heads ({self.latent_heads})")
        if self.position_encoding not in POSITION_ENCODINGS:
            fail(f"position_encoding must be one of {POSITION_ENCODINGS}")
        if self.absolute_table not in ABSOLUTE_TABLES:
            fail(f"absolute_table must be one of {ABSOLUTE_TABLES}")
        if self.activation not in ACTIVATIONS:
            fail(f"activation must be one of {ACTIVATIONS}")
        if self.cross_attend_dropout_mode not in CROSS_ATTEND_DROPOUT_MODES:
            fail(f"cross_attend_dropout_mode must be one of {CROSS_ATTEND_DROPOUT_MODES}")
        for name in ("dropout", "cross_attend_dropout", "latent_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                fail(f"{name} must be in [0, 1), got {rate}")
        if self.position_encoding == "rotary":
            if not 0.0 < self.rotary_fraction <= 1.0:
                fail(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
            if self.cross_attend_rotary_dim == 0 or self.latent_rotary_dim == 0:
                fail("rotary_fraction rotates no channel: raise it or use wider heads")
            if self.max_wavelength < 1:
                fail(f"max_wavelength must be >= 1, got {self.max_wavelength}")
        if any(s < 2 for s in self.position_table_sizes):
            fail(f"position_table_sizes must be >= 2, got {self.position_table_sizes}")
        if self.cross_attend_chunk_size < 0:
            fail("cross_attend_chunk_size must be >= 0")

    # Derived fields -----------------------------------------------------------

    @property
    def cross_attend_head_dim(self) -> int:
        return self.input_dim // self.cross_attend_heads

    @property
    def latent_head_dim(self) -> int:
        return self.latent_dim // self.latent_heads

    @property
    def cross_attend_rotary_dim(self) -> int:
        """Channels that rotate in each cross-attend head (official rounding)."""
        return int(self.cross_attend_head_dim * self.rotary_fraction // 2) * 2

    @property
    def latent_rotary_dim(self) -> int:
        return int(self.latent_head_dim * self.rotary_fraction // 2) * 2

    # Serialisation ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["position_table_sizes"] = list(self.position_table_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerceiverARConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PerceiverARConfig fields: {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PerceiverARConfig:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object of config fields")
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PerceiverARConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Named presets. "tiny" is for tests, "demo" trains in minutes on 2 CPU cores,
# the others follow the paper's sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        context_len=64,
        num_latents=16,
        input_dim=32,
        latent_dim=32,
        num_latent_layers=2,
        cross_attend_heads=4,
        latent_heads=4,
    ),
    "demo": dict(
        context_len=256,
        num_latents=128,
        input_dim=128,
        latent_dim=128,
        num_latent_layers=4,
        cross_attend_heads=4,
        latent_heads=4,
    ),
    "small": dict(
        context_len=4096,
        num_latents=512,
        input_dim=512,
        latent_dim=512,
        num_latent_layers=6,
        cross_attend_heads=8,
        latent_heads=8,
    ),
    # Paper section 5.5 (PG-19 / books): 4096 inputs, 2048 latents.
    "pg19": dict(
        context_len=4096,
        num_latents=2048,
        input_dim=1024,
        latent_dim=1024,
        num_latent_layers=12,
        cross_attend_heads=16,
        latent_heads=16,
        cross_attend_dropout=0.5,
    ),
    # Modalities (docs/modalities.md), sized for minutes of training on 2 CPU
    # cores. Fashion-MNIST: 28x28 grey images are 784 subpixels plus SOS.
    "image-fmnist": dict(
        context_len=785,
        num_latents=128,
        input_dim=128,
        latent_dim=128,
        num_latent_layers=4,
        cross_attend_heads=4,
        latent_heads=4,
        position_encoding="absolute",
    ),
    "music": dict(
        context_len=1024,
        num_latents=128,
        input_dim=128,
        latent_dim=128,
        num_latent_layers=4,
        cross_attend_heads=4,
        latent_heads=4,
    ),
    "audio": dict(
        context_len=2048,
        num_latents=256,
        input_dim=128,
        latent_dim=128,
        num_latent_layers=4,
        cross_attend_heads=4,
        latent_heads=4,
    ),
    # The copy task at N = 1024 on CPU (benchmarks/train_copy.py): absolute
    # sinusoidal positions as the official copy configs, one latent per
    # mirrored target. Reached 99.91% of the mirrored half in 11.4 minutes.
    "copy-1024": dict(
        context_len=1024,
        num_latents=512,
        input_dim=128,
        latent_dim=128,
        num_latent_layers=1,
        cross_attend_heads=4,
        latent_heads=4,
        position_encoding="absolute",
        absolute_table="sinusoidal",
    ),
    # The official copy-task config: 131,072 inputs, 1024 latents. One CPU
    # training step peaks at 5.9 GB; the chunking and checkpointing switches
    # did not lower that on CPU (docs/long_context.md), so they stay off.
    "copy-131k": dict(
        context_len=131072,
        num_latents=1024,
        input_dim=1024,
        latent_dim=1024,
        num_latent_layers=6,
        cross_attend_heads=16,
        latent_heads=16,
        position_encoding="absolute",
        absolute_table="sinusoidal",
    ),
}
