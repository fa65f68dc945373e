"""``perceiver-ar convert-official``: official Haiku parameters -> model directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-official",
        help="convert official JAX/Haiku parameters (.npz) into a model directory",
        description="Convert an .npz dump of official Perceiver AR parameters (keys 'params/<haiku path>' "
        "or '<haiku path>') and the official PerceiverAR keyword arguments (JSON) into a model "
        "directory (config.json + model.safetensors).",
    )
    p.add_argument("params", help="the .npz file of official parameters")
    p.add_argument(
        "config",
        help="JSON file of the official PerceiverAR kwargs (or an .npz with config_json)",
    )
    p.add_argument(
        "out_dir", help="the model directory to write (new or empty, or a model directory with --overwrite)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the model directory already at out_dir")
    p.set_defaults(func=run, must_exist={"params": ("params", "file"), "config": ("config", "file")})


def run(args: argparse.Namespace) -> int:
    from ..convert import convert_official

    model = convert_official(args.params, args.config, args.out_dir, overwrite=args.overwrite)
    cfg = model.config
    print(
        f"wrote {args.out_dir}: N={cfg.context_len} M={cfg.num_latents} E={cfg.input_dim} "
        f"D={cfg.latent_dim} L={cfg.num_latent_layers} {cfg.position_encoding}, "
        f"{model.num_parameters():,} parameters"
    )
    return 0
