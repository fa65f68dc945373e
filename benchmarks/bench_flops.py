"""CPU efficiency: achieved FLOP/s of a training step against a measured fp32 matmul peak.

FLOPs are counted analytically (``training_flops``): every matmul of the
forward pass at 2 FLOPs per multiply-add; attention scores and weighted sums
over what the causal kernels compute: a latent reads all T - M prefix inputs
and, causally, half of the M x M square on average (flash kernels skip the
blocks above the diagonal), and each latent layer half of its M x M square;
the backward counts as 2x the forward. The peak is the median rate of a
square fp32 ``torch.mm`` on the same threads, measured in its own process;
each model process also measures it just before and just after its steps,
and "of that peak" is the median over rounds of each process's rate against
the peak it measured (the machine's speed drifts between processes).
Each case (the peak among them) runs in a fresh process once per round, the
order alternating over ``--rounds`` rounds; the table gives medians and the
JSON keeps every run. The load average is printed at the start and the end.

    python benchmarks/bench_flops.py            # ~8 min here
    python benchmarks/bench_flops.py --quick    # seconds, smoke test
"""

from __future__ import annotations

import argparse

from common import (
    LoadWatch,
    machine_info,
    median,
    median_of,
    new_figure,
    ok_runs,
    report_table,
    run_rounds,
    save_figure,
    script_main,
    set_threads,
    timed,
)


def forward_flops(cfg: dict, n: int, m: int, batch: int) -> dict[str, float]:
    """Forward FLOPs of one batch of full rows of n inputs with m latents, by part."""
    E, D = cfg["input_dim"], cfg["latent_dim"]
    V = cfg.get("vocab_size", 259)
    wc, wl = cfg.get("cross_attend_widening", 4), cfg.get("latent_widening", 4)
    L = cfg["num_latent_layers"]
    parts = {
        "latent_init": 2 * m * E * D,
        "cross_qo": 2 * m * D * E + 2 * m * E * D,
        "cross_kv": 2 * 2 * n * E * E,
        # scores q.k and the weighted sum of v: the prefix whole, the square half
        "cross_attention": 2 * 2 * m * ((n - m) + m / 2) * E,
        "cross_mlp": 2 * 2 * m * D * wc * D,
        "latent_proj": L * 4 * 2 * m * D * D,
        "latent_attention": L * 2 * 2 * (m * m / 2) * D,
        "latent_mlp": L * 2 * 2 * m * D * wl * D,
        "logits": 2 * m * D * V,
    }
    return {k: float(v * batch) for k, v in parts.items()}


def training_flops(cfg: dict, n: int, m: int, batch: int) -> float:
    """Forward + backward (2x forward) FLOPs of one training step."""
    return 3.0 * sum(forward_flops(cfg, n, m, batch).values())


def matmul_gflops(size: int, repeats: int) -> tuple[float, list[float]]:
    """The rate of a square fp32 ``torch.mm`` of side ``size``: GFLOP/s (median) and every time."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    times = timed(lambda: torch.mm(a, b), repeats=repeats, warmup=2)
    return 2 * size**3 / median(times) / 1e9, times


def run_one(case: dict) -> dict:
    threads = set_threads(case["threads"])
    if case["kind"] == "matmul":
        gflops, times = matmul_gflops(case["size"], case["repeats"])
        return {"gflops": gflops, "times": times, "threads": threads}

    from common import build_model, make_train_step, random_batch

    cfg = case["config"]
    model = build_model(cfg)
    inputs, targets = random_batch(case["batch"], cfg["context_len"])
    step = make_train_step(model, inputs, targets, num_latents=case["num_latents"])
    # The peak again in this process, just before and just after the steps: the
    # machine's speed drifts between processes, so the fraction of peak is taken
    # against a peak measured under the same conditions as the steps.
    before, _ = matmul_gflops(case["peak_size"], case["peak_repeats"])
    times = timed(step, repeats=case["repeats"], warmup=1)
    after, _ = matmul_gflops(case["peak_size"], case["peak_repeats"])
    return {"step_s": median(times), "times": times, "threads": threads, "peak_gflops": [before, after]}


CASES = [
    # name, N, M, batch
    ("Perceiver AR", 4096, 512, 2),
    ("Perceiver AR", 16384, 1024, 1),
    ("decoder-only", 4096, 4096, 1),
]


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--width", type=int, default=512, help="E = D")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of fresh processes")
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cases = CASES
    if args.quick:
        args.width, args.heads, args.layers, args.matmul_size, args.repeats = 32, 2, 1, 256, 1
        args.rounds = 1
        cases = [("Perceiver AR", 128, 32, 2), ("decoder-only", 128, 128, 1)]
    watch = LoadWatch("bench_flops")
    specs: dict[str, dict] = {
        "matmul peak": {"kind": "matmul", "size": args.matmul_size, "repeats": 5 * args.repeats}
    }
    configs = {}
    for name, n, m, batch in cases:
        cfg = dict(
            context_len=n,
            num_latents=m,
            input_dim=args.width,
            latent_dim=args.width,
            num_latent_layers=args.layers,
            cross_attend_heads=args.heads,
            latent_heads=args.heads,
        )
        key = f"{name} N={n} M={m} B={batch}"
        configs[key] = (name, n, m, batch, cfg)
        specs[key] = {
            "kind": "model",
            "config": cfg,
            "num_latents": m,
            "batch": batch,
            "repeats": args.repeats,
            "peak_size": args.matmul_size,
            "peak_repeats": 2 * args.repeats,
        }
    for spec in specs.values():
        spec["threads"] = args.threads

    def describe(key: str, r: dict) -> str:
        return f"{r['gflops']:.1f} GFLOP/s" if "gflops" in r else f"{r['step_s']:.2f} s/step"

    runs = run_rounds(
        __file__,
        specs,
        args.rounds,
        inline=(lambda key: run_one) if args.quick else None,
        describe=describe,
    )
    peaks = [r["gflops"] for r in ok_runs(runs["matmul peak"])]
    peak_gflops = median(peaks)
    rows = []
    for key, (name, n, m, batch, cfg) in configs.items():
        flops = training_flops(cfg, n, m, batch)
        row = {"model": name, "N": n, "M": m, "batch": batch, "gflop_step": flops / 1e9, "runs": runs[key]}
        step_s = median_of(runs[key], "step_s")
        if step_s is None:
            row["note"] = runs[key][-1].get("error", "no run")
        else:
            row["step_s"] = step_s
            row["achieved_gflops"] = flops / step_s / 1e9
            row["fraction_of_peak"] = row["achieved_gflops"] / peak_gflops
            # Each process's steps against the peak it measured around them, then the median.
            fractions = [
                flops / r["step_s"] / 1e9 / median(r["peak_gflops"])
                for r in ok_runs(runs[key])
                if "peak_gflops" in r
            ]
            if fractions:
                row["fraction_of_own_peak"] = median(fractions)
                # The divisor of each process (the median of its two peaks), median over processes.
                row["own_peak_gflops"] = median([median(r["peak_gflops"]) for r in ok_runs(runs[key])])
        row["parts"] = forward_flops(cfg, n, m, batch)
        rows.append(row)
    load = watch.finish()

    info = machine_info(args.threads)
    cols = [
        ("model", "model", ""),
        ("N", "N", ""),
        ("M", "M", ""),
        ("batch", "batch", ""),
        ("gflop_step", "GFLOP/step", ".0f"),
        ("step_s", "s/step", ".2f"),
        ("achieved_gflops", "achieved GFLOP/s", ".1f"),
        ("fraction_of_peak", "of matmul peak", ".0%"),
        ("own_peak_gflops", "own peak (median of processes)", ".1f"),
        ("fraction_of_own_peak", "median of rate / own peak", ".0%"),
    ]
    title = (
        f"E=D={args.width}, {args.heads} heads, L={args.layers}; fp32 matmul peak "
        f"{peak_gflops:.1f} GFLOP/s (median of {len(peaks)}: {', '.join(f'{x:.1f}' for x in peaks)}); "
        f"medians of {args.rounds} alternating rounds of fresh processes; {info['threads']} threads, "
        f"{info['cpu']}; load average {load['load_average_start']} -> {load['load_average_end']}"
    )
    name = "bench_flops_quick" if args.quick else "bench_flops"
    payload = {
        "machine": info,
        **load,
        "args": vars(args),
        "matmul_peak_gflops": peaks,
        "matmul_runs": runs["matmul peak"],
    }
    report_table(name, title, rows, cols, payload)

    fig, ax = new_figure(figsize=(7, 4))
    labels = [f"{r['model']}\nN={r['N']} M={r['M']} B={r['batch']}" for r in rows]
    ax.bar(
        range(len(rows)),
        [r.get("achieved_gflops", 0.0) for r in rows],
        color="tab:blue",
        label="training step",
    )
    ax.axhline(peak_gflops, color="tab:red", linestyle="--", label=f"fp32 matmul peak {peak_gflops:.0f}")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"Achieved FLOP/s of a training step ({info['threads']} threads)")
    ax.legend()
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    script_main(run_one, main)
