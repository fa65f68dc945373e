"""Cost of a training step with each form of cross-attend dropout.

The official form (mode "mask") hides random inputs through the attention
mask, so the step costs what it costs without dropout; the compute-saving
form (mode "drop") removes the same share of prefix inputs before the
cross-attend, so the step gets cheaper as the rate grows. A step here is
forward, loss and backward (no optimizer). Each case (no dropout, then each
mode at rates 0.5 and 0.75) runs in a fresh process: one warm-up step, then
``--repeats`` timed steps; ``--rounds`` alternate all cases so drift on a
shared machine hits each alike, and medians over all timed steps are reported.

    python benchmarks/bench_cross_attend_dropout.py           # N=8192, M=512
    python benchmarks/bench_cross_attend_dropout.py --quick   # seconds, smoke test
"""

from __future__ import annotations

import argparse

from common import (
    format_table,
    machine_info,
    markdown_table,
    median,
    new_figure,
    run_case,
    save_figure,
    save_results,
    script_main,
    set_threads,
    timed,
)

RATES = (0.5, 0.75)


def run_one(case: dict) -> dict:
    import torch

    from perceiver_ar import PerceiverAR, PerceiverARConfig, perceiver_ar_loss

    threads = set_threads(case["threads"])
    torch.manual_seed(0)
    model = PerceiverAR(PerceiverARConfig(**case["config"])).train()
    x = torch.randint(3, 259, (case["batch"], case["config"]["context_len"]))
    targets = torch.roll(x, -1, dims=1)

    def step() -> None:
        out = model(x)
        perceiver_ar_loss(out.logits, targets, out.latent_index).mean.backward()
        model.zero_grad(set_to_none=True)

    return {"times": timed(step, repeats=case["repeats"], warmup=1), "threads": threads}


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round, in-process (smoke test)")
    p.add_argument("--context-len", type=int, default=8192, help="N")
    p.add_argument("--num-latents", type=int, default=512, help="M")
    p.add_argument("--width", type=int, default=256, help="E = D")
    p.add_argument("--layers", type=int, default=2, help="latent layers L")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of a fresh process per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.context_len, args.num_latents, args.width, args.layers = 256, 32, 32, 1
        args.batch, args.repeats, args.rounds = 1, 1, 1
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
    for rate in RATES:
        for mode in ("mask", "drop"):
            cases[f"{mode} {rate}"] = dict(cross_attend_dropout=rate, cross_attend_dropout_mode=mode)
    times: dict[str, list[float]] = {name: [] for name in cases}
    threads = args.threads
    for r in range(args.rounds):
        for name, extra in cases.items():
            case = {
                "config": {**base, **extra},
                "batch": args.batch,
                "repeats": args.repeats,
                "threads": args.threads,
            }
            res = run_case(__file__, case, timeout=args.timeout, inline=run_one if args.quick else None)
            if "error" in res:
                raise SystemExit(f"{name}: {res['error']}")
            times[name].extend(res["times"])
            threads = res["threads"]
            print(f"round {r + 1} {name}: {median(res['times']):.3f} s/step", flush=True)

    none = median(times["none"])
    rows = [
        {"case": name, "step_s": median(t), "vs_none": median(t) / none, "times": t}
        for name, t in times.items()
    ]
    cols = [("case", "case", ""), ("step_s", "step s", ".3f"), ("vs_none", "vs none", ".2f")]
    info = machine_info(threads)
    print(
        f"\nN={args.context_len} M={args.num_latents} E=D={args.width} L={args.layers} B={args.batch} "
        f"threads={threads}; medians of {args.rounds} x {args.repeats} steps"
    )
    print(format_table(rows, cols))
    name = "bench_cross_attend_dropout_quick" if args.quick else "bench_cross_attend_dropout"
    save_results(
        name, {"machine": info, "args": vars(args), "rows": rows, "markdown": markdown_table(rows, cols)}
    )

    fig, ax = new_figure(figsize=(6, 4))
    ax.bar([r["case"] for r in rows], [r["vs_none"] for r in rows], color=["C7", "C0", "C1", "C0", "C1"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("step time / no dropout")
    ax.set_title(f"cross-attend dropout, N={args.context_len}, M={args.num_latents}")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    script_main(run_one, main)
