"""``perceiver-ar inspect``: pictures of what the latents read (the cross-attend weights of one sequence)."""

from __future__ import annotations

import argparse

from .checks import NO_VERIFY_HELP, load_model, nonnegative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="draw the cross-attend weights of each latent over the inputs of one sequence",
        description="For one sequence of a store (inputs START .. START+LENGTH-1 of one document): the "
        "weight each latent's cross-attend gives to each input, per head and averaged, as a heat map "
        "(attention.png), and the attention mass against distance back from the latent's own input "
        "(distance.png); the arrays go to attention.npz, the numbers and checks to inspect.json. "
        "Long inputs are summed over blocks of positions, so memory stays bounded. "
        "Example: perceiver-ar inspect runs/demo --data data/shakespeare --out runs/demo/inspect",
    )
    p.add_argument("model", help="a run directory (its model/ is used) or a model directory")
    p.add_argument("--data", required=True, help="the data store (written by `perceiver-ar prepare`)")
    p.add_argument("--out", required=True, help="folder for the pictures (new, empty, or an earlier inspect)")
    p.add_argument("--split", default="validation", help="the split to take the sequence from")
    p.add_argument("--doc", type=nonnegative_int, default=0, help="document index in the split (default 0)")
    p.add_argument(
        "--start", type=nonnegative_int, default=0, help="first input: token index in the document"
    )
    p.add_argument(
        "--length", type=positive_int, help="inputs (default: the model's N, or what the document holds)"
    )
    p.add_argument(
        "--position-block",
        type=positive_int,
        help="inputs per heat-map column (default: enough for at most 1024 columns)",
    )
    p.add_argument(
        "--latent-block", type=positive_int, help="latents per heat-map row (default: at most 512 rows)"
    )
    p.add_argument(
        "--mean-only",
        action="store_true",
        help="the heat map shows the mean of the heads only (a smaller file)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.set_defaults(func=run, must_exist={"model": ("model", "dir"), "data": ("--data", "dir")})


def run(args: argparse.Namespace) -> int:
    from ..attention_maps import inspect_store
    from ..runtime import setup_runtime

    rt = setup_runtime(args.device, "fp32")  # weights are read exactly as trained
    model = load_model(args.model, rt, verify=not args.no_verify)
    result = inspect_store(
        model,
        args.data,
        args.out,
        split=args.split,
        document=args.doc,
        start=args.start,
        length=args.length,
        position_block=args.position_block,
        latent_block=args.latent_block,
        heads=not args.mean_only,
    )
    mass = dict(zip(result["distance_buckets"], result["distance_mass_mean"], strict=True))
    far = sum(m for label, m in mass.items() if int(label.split("-")[0]) >= 256)
    print(
        f"{result['num_latents']} latents x {result['num_inputs']} inputs, {result['heads']} heads "
        f"(blocks of {result['position_block']} inputs, {result['latent_block']} latents); "
        f"attention mass 256 or more inputs back: {far:.1%}; weights @ v = kernel output to "
        f"{result['kernel_error']:.1e}"
    )
    for path in result["files"].values():
        print(f"wrote {path}")
    return 0
