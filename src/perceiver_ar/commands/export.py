"""``perceiver-ar export``: a training checkpoint (plain or sharded) -> an ordinary model directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's checkpoint (sharded by FSDP or not) as a model directory",
        description="Consolidate a training checkpoint into a model directory (config.json, "
        "model.safetensors, provenance.json, MANIFEST.json) that eval, generate and render read. A "
        "sharded checkpoint (train --parallel fsdp) is gathered in this one process, whatever number of "
        "processes wrote it. Example: perceiver-ar export runs/big exported/big",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="a run directory (its newest checkpoint whose checksums pass) or one of its "
        "checkpoints/step_N folders",
    )
    p.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="the model directory to write (new or empty, or a model directory with --overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the model directory already at OUT_DIR")
    p.set_defaults(func=run, must_exist={"run": ("RUN", "dir")})


def run(args: argparse.Namespace) -> int:
    from ..run_checkpoints import export_model

    ckpt, model = export_model(args.run, args.out_dir, overwrite=args.overwrite)
    cfg = model.config
    print(
        f"wrote {args.out_dir} from {ckpt}: N={cfg.context_len} M={cfg.num_latents} E={cfg.input_dim} "
        f"D={cfg.latent_dim} L={cfg.num_latent_layers}, {model.num_parameters():,} parameters"
    )
    return 0
