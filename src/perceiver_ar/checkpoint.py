"""Model directories: ``config.json`` + ``model.safetensors`` (+ ``provenance.json``, ``MANIFEST.json``).

    config.json          the model config; a model is always rebuilt from it
    model.safetensors    the weights; its header also keeps a copy of the config
    provenance.json      the data the model was trained on (tokenizer, modality, layout)
    MANIFEST.json        every file with its size and SHA-256

No pickle is ever loaded: weights go through safetensors, the rest through
JSON. Loading checks, in this order and before any weight is read: the
checksums of the manifest (skipped with ``verify=False``; a directory without
a manifest, written before checksums existed, is loaded unchecked), that
config.json agrees with the copy of the config in the weights' header, and
that every tensor's name, shape and dtype in the header is the one the
config needs. Non-finite weights are never written.

This module sits below the model: ``PerceiverAR`` inherits ``save_pretrained``
and ``from_pretrained`` from ``Pretrained``, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import PerceiverARConfig
from .files import atomic_write, read_json, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROVENANCE_NAME = "provenance.json"
MANIFEST_NAME = "MANIFEST.json"
SHARDS_DIR = "shards"  # a sharded training checkpoint keeps its weights here, not in model.safetensors
MANIFEST_FORMAT = "perceiver-ar-manifest/1"
HEADER_CONFIG_KEY = "perceiver_ar_config"  # the config, as saved with the weights (safetensors metadata)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

ModelT = TypeVar("ModelT", bound="Pretrained")


# ----------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in blocks (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, **extra: Any) -> dict[str, Any]:
    """MANIFEST.json listing every other file under ``directory`` (by relative path, subfolders too)
    with its size and SHA-256, written last."""
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_NAME
    }
    manifest = {"format": MANIFEST_FORMAT, **extra, "files": files}
    write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def manifest_problem(directory: Path, names: list[str] | None = None, checksums: bool = True) -> str | None:
    """Why ``directory`` does not match its manifest (None: it does), for ``names`` or every listed file.

    Entries are ``{"bytes", "sha256"}``; a manifest written before checksums
    existed lists sizes only, and then sizes are all that is checked.
    ``checksums=False`` checks sizes only (cheap: listing checkpoints).
    """
    manifest = read_json(directory / MANIFEST_NAME)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"no readable {MANIFEST_NAME}"
    listed = manifest["files"]
    for name in names if names is not None else list(listed):
        entry = listed.get(name)
        if entry is None:
            continue
        path = directory / name
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("bytes"), entry.get("sha256"))
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if checksums and digest is not None and sha256_file(path) != digest:
            return f"{name} does not match its SHA-256 in {MANIFEST_NAME}"
    return None


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A training run directory means its published ``model/``; anything else is taken as is."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file() and (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    return p


def is_model_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model written by this tool (a manifest of ours, or our config.json)."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST_NAME)
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
        return True
    config = read_json(directory / CONFIG_NAME)
    try:
        PerceiverARConfig.from_dict(config)
    except (TypeError, ValueError):
        return False
    return (directory / WEIGHTS_NAME).is_file()


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_model(
    model: torch.nn.Module | dict[str, torch.Tensor],
    config: PerceiverARConfig,
    directory: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    manifest: bool = True,
) -> Path:
    """Write a model directory; each file is replaced atomically, the manifest last (unless not ``manifest``:
    a checkpoint adds files and writes its own).

    ``model`` is a module or its state dict (the whole weights of a sharded
    model, gathered). Refuses non-finite weights, and refuses to overwrite
    model files in a directory that does not hold a model this tool wrote.
    """
    directory = Path(directory)
    weights = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(
            f"the model's weights are not finite (NaN or inf in {', '.join(bad[:3])}): not saved"
        )
    ours = (CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_NAME, MANIFEST_NAME)
    if any((directory / n).exists() for n in ours) and not is_model_dir(directory):
        raise ValueError(
            f"{directory} holds files named like a model's ({', '.join(ours)}) that this tool did not write: "
            "save to another directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(config.to_dict(), sort_keys=True)
    metadata = {"format": "pt", HEADER_CONFIG_KEY: config_text}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=metadata))
    write_json(directory / CONFIG_NAME, config.to_dict())
    if provenance is not None:
        write_json(directory / PROVENANCE_NAME, provenance)
    elif (directory / PROVENANCE_NAME).exists():
        (directory / PROVENANCE_NAME).unlink()  # a previous save's: it would describe other data
    if manifest:
        write_manifest(directory)
    return directory


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_model_dir(
    directory: str | os.PathLike, verify: bool = True
) -> tuple[Path, PerceiverARConfig, dict[str, Any] | None]:
    """The directory, config and provenance (None when not recorded) of a model directory.

    ``verify``: check the files against MANIFEST.json (SHA-256) first.
    """
    directory = resolve_model_dir(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.exists() and (directory / SHARDS_DIR).is_dir():
        raise ValueError(
            f"{directory} is a sharded training checkpoint (written under --parallel fsdp), not a model "
            f"directory: `perceiver-ar export RUN OUT_DIR` writes one from it"
        )
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(written by save_pretrained)"
            )
    if verify and (directory / MANIFEST_NAME).is_file():
        problem = manifest_problem(directory, [CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_NAME])
        if problem:
            raise ValueError(
                f"{directory} is corrupt or was changed after it was saved: {problem}; "
                "restore it (or load it unchecked with verify=False / --no-verify)"
            )
    try:
        config = PerceiverARConfig.load(config_path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot read the model config {config_path}: {e}") from None
    provenance = read_json(directory / PROVENANCE_NAME) if (directory / PROVENANCE_NAME).is_file() else None
    if provenance is not None and not isinstance(provenance, dict):
        raise ValueError(f"{directory / PROVENANCE_NAME} is not a JSON object: restore it")
    return directory, config, provenance


def check_weights_header(
    directory: Path, config: PerceiverARConfig, expected: dict[str, tuple[int, ...]]
) -> None:
    """Compare the weights' safetensors header with the config, before any tensor is read.

    ``expected``: the shape of every tensor the config needs. The header must
    name exactly these, with these shapes and a floating-point dtype, and the
    copy of the config saved with the weights (when there is one: files
    written before it existed have none) must equal config.json.
    """
    weights_path = directory / WEIGHTS_NAME
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
    saved = metadata.get(HEADER_CONFIG_KEY)
    if saved is not None:
        try:
            saved_cfg = PerceiverARConfig.from_dict(json.loads(saved)).to_dict()
        except (ValueError, TypeError):
            saved_cfg = None  # a newer or foreign config: the shapes below still decide
        current = config.to_dict()
        if saved_cfg is not None and saved_cfg != current:
            diff = [f"{k} {current[k]!r} (saved: {v!r})" for k, v in saved_cfg.items() if current[k] != v]
            raise ValueError(
                f"{directory / CONFIG_NAME} contradicts the config saved with its weights: "
                f"{', '.join(diff)}; restore config.json (num_latents can be changed per call instead)"
            )
    where = f"{weights_path} does not match {directory / CONFIG_NAME}"
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, (shape, dtype) in header.items():
        if shape != expected[name]:
            raise ValueError(f"{where}: {name} has shape {shape}, the config needs {expected[name]}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: {name} holds {dtype}, not floating-point weights")


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for a module built from a ``PerceiverARConfig``.

    ``provenance`` describes the data the model was trained on (see
    ``perceiver_ar.provenance``); it is saved with the model and comes back
    with it (None for models saved without one).
    """

    config: PerceiverARConfig
    provenance: dict[str, Any] | None = None

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors, provenance.json (when known) and MANIFEST.json."""
        return save_model(self, self.config, directory, self.provenance)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(
        cls: type[ModelT],
        directory: str | os.PathLike,
        map_location: str | torch.device = "cpu",
        verify: bool = True,
    ) -> ModelT:
        """Rebuild a model from a directory written by ``save_pretrained`` (or a run directory).

        ``verify=False`` skips the SHA-256 check of the files (for trusted,
        very large models: it reads every byte once more, see README "Safety");
        the header and config checks always run.
        """
        directory, config, provenance = read_model_dir(directory, verify)
        with torch.device("meta"):  # the shapes the config needs, without allocating them
            expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}  # type: ignore[call-arg, attr-defined]
        check_weights_header(directory, config, expected)
        try:
            state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{directory / WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
        model = cls(config)  # type: ignore[call-arg]
        model.load_state_dict(state)  # type: ignore[attr-defined]
        model.provenance = provenance
        return model.to(map_location)  # type: ignore[attr-defined]
