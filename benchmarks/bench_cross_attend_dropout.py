"""Cost of a training step with each form of cross-attend dropout.

The official form (mode "mask") hides random inputs through the attention
mask, so the step costs what it costs without dropout; the compute-saving
form (mode "drop") removes the same share of prefix inputs before the
cross-attend, so the step gets cheaper as the rate grows.

    python benchmarks/bench_cross_attend_dropout.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from perceiver_ar import PerceiverAR, PerceiverARConfig, perceiver_ar_loss  # noqa: E402


def step_seconds(model: PerceiverAR, x: torch.Tensor) -> float:
    targets = torch.roll(x, -1, dims=1)
    t0 = time.perf_counter()
    out = model(x)
    loss = perceiver_ar_loss(out.logits, targets, out.latent_index).mean
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    ap.add_argument("--context-len", type=int, default=8192)
    ap.add_argument("--num-latents", type=int, default=512)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/cross_attend_dropout.json")
    args = ap.parse_args()
    if args.quick:
        args.context_len, args.num_latents, args.width, args.layers, args.batch, args.repeats = (
            256,
            32,
            32,
            1,
            1,
            1,
        )
    torch.set_num_threads(args.threads)
    base = dict(
        context_len=args.context_len,
        num_latents=args.num_latents,
        input_dim=args.width,
        latent_dim=args.width,
        num_latent_layers=args.layers,
        cross_attend_heads=4,
        latent_heads=4,
    )
    cases = {"none": {}}
    for rate in (0.5, 0.75):
        cases[f"mask {rate}"] = dict(cross_attend_dropout=rate, cross_attend_dropout_mode="mask")
        cases[f"drop {rate}"] = dict(cross_attend_dropout=rate, cross_attend_dropout_mode="drop")
    torch.manual_seed(0)
    models = {name: PerceiverAR(PerceiverARConfig(**base, **kw)).train() for name, kw in cases.items()}
    x = torch.randint(3, 259, (args.batch, args.context_len))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for model in models.values():  # warm-up
        step_seconds(model, x)
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for name, model in models.items():
            times[name].append(step_seconds(model, x))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"N={args.context_len} M={args.num_latents} E=D={args.width} L={args.layers} "
        f"B={args.batch} threads={args.threads}, median of {args.repeats}"
    )
    print(f"{'case':<10} {'step s':>8} {'vs none':>8}")
    for name, sec in medians.items():
        print(f"{name:<10} {sec:8.3f} {sec / medians['none']:8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "median_step_s": medians, "all_s": times}, indent=2))


if __name__ == "__main__":
    main()
