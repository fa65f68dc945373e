"""Load weights of the official JAX/Haiku Perceiver AR into this library.

``from_official(params, config)`` takes the flat Haiku parameter dict
(``"module/path/param" -> array``, as in an ``.npz`` dump) and the official
``PerceiverAR`` keyword arguments, and returns a ``PerceiverAR`` that computes
the same logits. Options the official code has but this model does not
implement are refused with a clear error unless they are at the value this
model computes.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import is_model_dir
from .config import PerceiverARConfig
from .files import check_output_path, is_empty_dir, publish_dir, remove_temp, temp_dir_beside
from .model import PerceiverAR

ROOT = "perceiver_ar"

# Official options this model computes only at one value: (kwarg, required value, why).
_FIXED_OPTIONS = (
    ("use_positions_from_data", True, "positions are always taken from the data (1-based)"),
    ("mask_style", "final_block", "latents always sit on the final block of inputs"),
    ("num_latents_per_position", 1, "one latent per position"),
    ("initial_query_embed_style", "none", "initial latents are Linear(embedding)"),
    ("initial_query_offsetting", False, "query positions are not offset"),
    ("include_initial_cross_attention", True, "the cross-attend is always present"),
    ("additional_cross_attend_after_layers", [], "there is one cross-attend only"),
    ("cross_attention_shape_for_attn", "kv", "cross-attend q/k/v are E channels wide"),
    ("encoder_use_query_residual", True, "the cross-attend keeps its query residual"),
    ("train_input_positions", 0, "use cross_attend_dropout_mode='drop' instead"),
    ("fraction_heads_to_rotate", 1.0, "every head is rotated"),
    ("use_negative_rotary_positions", False, "rotary positions are the data positions"),
    ("label_smoothing", 0.0, "the loss has no label smoothing"),
)
# Options with no effect on what the model computes (memory layout, unused branches).
_IGNORED_OPTIONS = {
    "chunked_cross_attention",
    "chunked_cross_query_size",
    "chunked_cross_key_size",
    "cross_attention_head_group_size",
    "concat_pos",
    "z_pos_enc_init_scale",
    "share_learned_initial_query",
    "initial_query_embed_activation_name",
    "initial_query_embed_num_layers",
    "param_seed",
}
_MAPPED_OPTIONS = {
    "num_classes",
    "input_idx_size",
    "max_context_length",
    "position_encoding_type",
    "input_embed_dim",
    "position_encoding",
    "learnable_position_embeddings",
    "num_transformers_per_block",
    "z_index_dim",
    "num_z_channels",
    "num_cross_attend_heads",
    "num_transformer_heads",
    "cross_attend_widening_factor",
    "transformer_widening_factor",
    "dropout_prob",
    "latent_dropout_prob",
    "encoder_dropout_prob",
    "activation_name",
    "fraction_to_rotate",
    "max_wavelength",
    "final_layer_init_zeros",
    "z_loss",
}
# PerceiverAR constructor defaults for the keys we map, used when a kwarg is absent.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "input_embed_dim": 1024,
    "position_encoding": "sinusoidal",
    "learnable_position_embeddings": False,
    "num_transformers_per_block": 12,
    "z_index_dim": 1024,
    "num_z_channels": 1024,
    "num_cross_attend_heads": 1,
    "num_transformer_heads": 8,
    "cross_attend_widening_factor": 1,
    "transformer_widening_factor": 1,
    "dropout_prob": 0.0,
    "latent_dropout_prob": 0.0,
    "encoder_dropout_prob": 0.0,
    "activation_name": "sq_relu",
    "fraction_to_rotate": 0.25,
    "max_wavelength": 8192,
    "final_layer_init_zeros": True,
    "use_positions_from_data": False,
}


def config_from_official(kwargs: Mapping[str, Any]) -> PerceiverARConfig:
    """Translate official ``PerceiverAR`` keyword arguments into a config."""
    kw = dict(kwargs)
    known = {name for name, _, _ in _FIXED_OPTIONS} | _IGNORED_OPTIONS | _MAPPED_OPTIONS
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"unknown official PerceiverAR options: {unknown}")
    for name in ("num_classes", "max_context_length", "position_encoding_type"):
        if name not in kw:
            raise ValueError(f"the official config must give {name!r}")
    for name, value, meaning in _FIXED_OPTIONS:
        given = kw.get(name, _OFFICIAL_DEFAULTS.get(name, value))
        if name == "additional_cross_attend_after_layers" and given is None:
            given = []
        if given != value:
            raise ValueError(
                f"official option {name}={given!r} is not supported: this model computes "
                f"{name}={value!r} ({meaning})"
            )

    def get(name: str) -> Any:
        return kw.get(name, _OFFICIAL_DEFAULTS.get(name))

    activation = get("activation_name")
    if activation not in ("sq_relu", "gelu"):
        raise ValueError(f"official activation_name={activation!r} is not supported (sq_relu or gelu)")
    pe_type = kw["position_encoding_type"]
    context_len = int(kw["max_context_length"])
    cfg: dict[str, Any] = dict(
        vocab_size=int(kw["num_classes"]),
        context_len=context_len,
        num_latents=int(get("z_index_dim")),
        input_dim=int(get("input_embed_dim")),
        latent_dim=int(get("num_z_channels")),
        num_latent_layers=int(get("num_transformers_per_block")),
        cross_attend_heads=int(get("num_cross_attend_heads")),
        latent_heads=int(get("num_transformer_heads")),
        cross_attend_widening=int(get("cross_attend_widening_factor")),
        latent_widening=int(get("transformer_widening_factor")),
        activation=activation,
        dropout=float(get("dropout_prob")),
        cross_attend_dropout=float(get("encoder_dropout_prob")),
        latent_dropout=float(get("latent_dropout_prob")),
        position_encoding=pe_type,
        final_layer_init_zeros=bool(get("final_layer_init_zeros")),
    )
    if "z_loss" in kw:
        cfg["z_loss"] = float(kw["z_loss"])
    if pe_type == "rotary":
        if int(get("max_wavelength")) < context_len:
            raise ValueError("official rotary configs need max_wavelength >= max_context_length")
        cfg.update(
            rotary_fraction=float(get("fraction_to_rotate")), max_wavelength=int(get("max_wavelength"))
        )
    elif pe_type == "absolute":
        table, learnable = get("position_encoding"), bool(get("learnable_position_embeddings"))
        if table == "sinusoidal":
            cfg["absolute_table"] = "learned" if learnable else "sinusoidal"
        elif table == "random" and learnable:
            cfg["absolute_table"] = "learned"
        else:
            raise ValueError(
                f"official position_encoding={table!r} with learnable_position_embeddings={learnable} "
                "is not supported: use 'sinusoidal', or 'random' with learnable tables"
            )
        sizes = kw.get("input_idx_size")
        if sizes is None:
            raise ValueError("official absolute configs must give input_idx_size")
        cfg["position_table_sizes"] = tuple(context_len if int(s) == -1 else int(s) for s in sizes)
    else:
        raise ValueError(f"unknown official position_encoding_type {pe_type!r}")
    return PerceiverARConfig(**cfg)


def _official_names(config: PerceiverARConfig) -> dict[str, tuple[str, str]]:
    """Our state-dict name -> (Haiku path, kind); kind says how to convert."""
    names: dict[str, tuple[str, str]] = {}

    def linear(ours: str, theirs: str) -> None:
        names[f"{ours}.weight"] = (f"{theirs}/w", "linear_w")
        names[f"{ours}.bias"] = (f"{theirs}/b", "same")

    def norm(ours: str, theirs: str) -> None:
        names[f"{ours}.weight"] = (f"{theirs}/scale", "same")
        names[f"{ours}.bias"] = (f"{theirs}/offset", "same")

    def attention(ours: str, theirs: str) -> None:
        for w, suffix in zip(("wq", "wk", "wv", "wo"), ("", "_1", "_2", "_3"), strict=True):
            linear(f"{ours}.{w}", f"{theirs}/linear{suffix}")

    def dense(ours: str, theirs: str) -> None:
        linear(f"{ours}.w1", f"{theirs}/linear")
        linear(f"{ours}.w2", f"{theirs}/linear_1")

    sub = f"{ROOT}/~"
    names["tok_embeddings.weight"] = (f"{sub}/embed/embeddings", "same")
    if config.position_encoding == "absolute":
        for i in range(len(config.position_table_sizes)):
            names[f"pos_embeddings.{i}.weight"] = (f"{sub}/embed_{i + 1}/embeddings", "same")
    linear("latent_init", f"{sub}/linear")
    ca = f"{sub}/cross_attention"
    norm("cross_attend.query_norm", f"{ca}/layer_norm")
    norm("cross_attend.kv_norm", f"{ca}/layer_norm_1")
    attention("cross_attend.attention", f"{ca}/attention")
    norm("cross_attend.ffn_norm", f"{ca}/layer_norm_2")
    dense("cross_attend.feed_forward", f"{ca}/dense")
    for i in range(config.num_latent_layers):
        sa = f"{sub}/self_attention" + (f"_{i}" if i else "")
        norm(f"latent_layers.{i}.attention_norm", f"{sa}/layer_norm")
        attention(f"latent_layers.{i}.attention", f"{sa}/attention")
        norm(f"latent_layers.{i}.ffn_norm", f"{sa}/layer_norm_1")
        dense(f"latent_layers.{i}.feed_forward", f"{sa}/dense")
    norm("norm", f"{ROOT}/layer_norm")
    linear("output", f"{sub}/logits")
    return names


def from_official(params: Mapping[str, Any], config: Mapping[str, Any]) -> PerceiverAR:
    """Build a model from official Haiku parameters and ``PerceiverAR`` kwargs.

    ``params`` maps ``"perceiver_ar/~/embed/embeddings"``-style paths (a
    leading ``params/`` is stripped) to arrays. Unknown or missing paths and
    shape mismatches are errors.
    """
    cfg = config_from_official(config)
    params = {k.removeprefix("params/"): v for k, v in params.items()}
    model = PerceiverAR(cfg)
    state = model.state_dict()
    names = _official_names(cfg)
    wanted = {path for path, _ in names.values()}
    unknown = sorted(set(params) - wanted)
    missing = sorted(wanted - set(params))
    if unknown or missing:
        raise ValueError(
            "official parameters do not match the config: "
            f"unknown paths {unknown[:6]}{' ...' if len(unknown) > 6 else ''}, "
            f"missing paths {missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    new_state = {}
    for ours, (path, kind) in names.items():
        array = np.asarray(params[path], dtype=np.float32)
        tensor = torch.from_numpy(array.T.copy() if kind == "linear_w" else array.copy())
        if tensor.shape != state[ours].shape:
            note = " (Haiku weights are [in, out])" if kind == "linear_w" else ""
            raise ValueError(
                f"official parameter {path} has shape {tuple(array.shape)}, but the config needs "
                f"{tuple(state[ours].shape)}{note}"
            )
        new_state[ours] = tensor
    model.load_state_dict(new_state)
    return model


# What numpy raises on a truncated or damaged .npz (a zip of .npy files).
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def load_official_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read the ``params/...`` arrays of an ``.npz`` dump (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [k for k in data.files if k.startswith("params/")] or [
                k for k in data.files if "/" in k and k.startswith(ROOT)
            ]
            params = {k.removeprefix("params/"): data[k] for k in keys}
    except NPZ_ERRORS as e:
        raise ValueError(
            f"cannot read {path} as an .npz parameter file (truncated or damaged?): {e}"
        ) from None
    if not params:
        raise ValueError(f"{path} holds no official parameters (keys like 'params/perceiver_ar/...')")
    return params


def read_official_config(path: str | Path) -> dict[str, Any]:
    """Read official kwargs from a JSON file or from the ``config_json`` of an .npz."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "config_json" not in data.files:
                    raise ValueError(f"{path} holds no config_json")
                text = str(data["config_json"])
        except NPZ_ERRORS as e:
            raise ValueError(f"cannot read {path} as an .npz file (truncated or damaged?): {e}") from None
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the config_json of {path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(
                f"the config_json of {path} must be a JSON object of PerceiverAR keyword arguments"
            )
        return cfg
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"cannot read the official config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object of PerceiverAR keyword arguments")
    return cfg


def convert_official(
    params_path: str | Path, config_path: str | Path, out_dir: str | Path, overwrite: bool = False
) -> PerceiverAR:
    """Convert an official .npz dump and its kwargs JSON into a model directory.

    ``out_dir`` must be new or empty, or (with ``overwrite``) a model directory;
    the model is written aside and renamed into place.
    """
    out = check_output_path(out_dir, [params_path, config_path], flag="out_dir", scanned=False)
    if out.exists() and not is_empty_dir(out):
        if not is_model_dir(out):
            raise ValueError(
                f"out_dir {out_dir} is not empty and is not a model directory: choose another out_dir"
            )
        if not overwrite:
            raise ValueError(f"out_dir {out_dir} already holds a model: pass --overwrite to replace it")
    model = from_official(load_official_npz(params_path), read_official_config(config_path))
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp)
        publish_dir(tmp, out)
    except BaseException:
        remove_temp(tmp)
        raise
    return model
