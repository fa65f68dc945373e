"""CPU threading for small models: the OpenMP wait policy and thread count, alone and on a busy CPU.

Why this library sets ``OMP_WAIT_POLICY=PASSIVE`` before torch starts, and
what that costs. A small model's training step is a chain of small
operations; with 2 threads each parallel one (a matrix product, an
attention) wakes the second thread. PASSIVE threads sleep between
operations, so every wake-up is a system call (tens of microseconds, more
than a small matrix product takes). Spinning threads wake at once, but on a
CPU shared with anything else a spinning thread burns the core that the
thread it waits for needs. libgomp (the OpenMP of torch's Linux wheels)
spins ``GOMP_SPINCOUNT`` times before it sleeps: 0 under PASSIVE, 300,000
when ``OMP_WAIT_POLICY`` is unset (its default), and that variable, when
set, overrides the policy's count.

The library's training step (forward, loss, backward, fused AdamW; random
full rows) runs for ``--seconds`` in a fresh process per case, under each
policy and thread count, in three settings: alone; beside one busy process
(a pure-Python loop, one core's worth of other work); and two identical
training processes at once. Rounds alternate the order of the cases; the
table gives the median step time over rounds (two at once: the mean of the
pair in each round) and the JSON keeps every run. Each process also times
one small matrix product alone ([128, 64] x [64, 64], the median of 500):
the cost of waking the second thread. A run of fewer cases than the default
writes ``bench_threads_partial``. The load average is
printed at the start and the end; other work running during the alone cases
makes them read like the busy ones.

    python benchmarks/bench_threads.py            # ~29 min here
    python benchmarks/bench_threads.py --quick    # seconds, smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product

from common import (
    LoadWatch,
    alternating,
    build_model,
    grouped_bars,
    machine_info,
    make_train_step,
    median,
    new_figure,
    random_batch,
    report_table,
    run_case,
    save_figure,
    script_main,
    set_threads,
    timed,
)

# The small size and the demo preset as `make demo` trains it.
SIZES = {
    "small": dict(N=256, M=64, D=64, heads=2, L=2, batch=2),
    "demo": dict(N=256, M=128, D=128, heads=4, L=4, batch=16),
}
QUICK_SIZE = {"tiny": dict(N=64, M=16, D=32, heads=2, L=1, batch=2)}
POLICIES = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},  # this library's default
    "spin 10k": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"},
    "spin 300k": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"},  # libgomp's unset default
}
SETTINGS = ["alone", "beside a busy process", "two at once"]
DEFAULT = ("PASSIVE", 2, "alone")  # what a user of this library gets on an idle 2-core machine
# One core's worth of other work; it ends by itself at its deadline (argv[1], seconds) or
# when the benchmark that started it is gone, even if that one is killed outright.
BUSY_LOOP = (
    "import os, sys, time\n"
    "end, parent = time.monotonic() + float(sys.argv[1]), os.getppid()\n"
    "while time.monotonic() < end and os.getppid() == parent:\n"
    "    time.perf_counter()\n"
)
# A pair starts its timed steps together: this many seconds after launch (start-up takes 3-8 s).
PAIR_START_DELAY_S = 15.0


def run_one(case: dict) -> dict:
    """In the case's process: train for ``seconds`` and report the median step time."""
    import torch

    threads = set_threads(case["threads"])
    s = case["size"]
    model = build_model(
        dict(
            vocab_size=259,
            context_len=s["N"],
            num_latents=s["M"],
            input_dim=s["D"],
            latent_dim=s["D"],
            num_latent_layers=s["L"],
            cross_attend_heads=s["heads"],
            latent_heads=s["heads"],
        )
    )
    # One small matrix product, timed alone: the cost of a parallel operation's wake-up.
    a, b = torch.randn(128, 64), torch.randn(64, 64)
    mm_times = timed(lambda: torch.mm(a, b), repeats=500, warmup=20)
    inputs, targets = random_batch(s["batch"], s["N"])
    step = make_train_step(model, inputs, targets)
    for _ in range(3):
        step()
    if case.get("start_at"):  # the pair's common start (wall clock), so their steps overlap
        time.sleep(max(0.0, case["start_at"] - time.time()))
    times = []
    end = time.perf_counter() + case["seconds"]
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "step_s": median(times),
        "mm_us": median(mm_times) * 1e6,
        "steps": len(times),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
    }


def run_setting(case: dict, setting: str, env: dict[str, str], timeout: float) -> list[dict]:
    """The case's processes in one setting: one, one beside a busy loop, or two at once."""
    if setting == "two at once":
        pair = {**case, "start_at": time.time() + PAIR_START_DELAY_S}
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(run_case, __file__, pair, env=env, timeout=timeout) for _ in range(2)]
            return [f.result() for f in futures]
    busy = None
    if setting == "beside a busy process":
        busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(timeout)])
    try:
        return [run_case(__file__, case, env=env, timeout=timeout)]
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model, one policy and thread count in each setting (smoke test)",
    )
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of fresh processes")
    p.add_argument("--seconds", type=float, default=5.0, help="training time per process")
    p.add_argument("--timeout", type=float, default=600.0)
    return p


def measure(args, name: str, size: dict) -> list[dict]:
    cases = list(product(args.policies, args.threads, args.settings))
    runs: dict[tuple, list[list[dict]]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for key in alternating(cases, r):
            policy, threads, setting = key
            case = {"size": size, "threads": threads, "seconds": args.seconds}
            res = run_setting(case, setting, POLICIES[policy], args.timeout)
            runs[key].append(res)
            msg = "; ".join(x.get("error") or f"{x['step_s'] * 1e3:.1f} ms/step" for x in res)
            print(f"round {r + 1}/{args.rounds} {name} {policy}, {threads} thr, {setting}: {msg}", flush=True)
    rows = []
    for (policy, threads, setting), per_round in runs.items():
        row = {"size": name, "policy": policy, "threads": threads, "setting": setting, "runs": per_round}
        ok = [rs for rs in per_round if rs and all("error" not in x for x in rs)]
        if ok:
            # Two at once: the mean step time of the pair in a round, then the median over rounds.
            row["step_ms"] = median([sum(x["step_s"] for x in rs) / len(rs) * 1e3 for rs in ok])
            row["mm_us"] = median([x["mm_us"] for rs in ok for x in rs])
        else:
            row["note"] = next((x["error"] for rs in per_round for x in rs if "error" in x), "not run")
        rows.append(row)
    by_key = {(r["policy"], r["threads"], r["setting"]): r for r in rows}
    default = by_key.get(DEFAULT, {}).get("step_ms")
    for row in rows:
        alone = by_key.get((row["policy"], row["threads"], "alone"), {}).get("step_ms")
        if "step_ms" in row and alone:
            row["vs_alone"] = row["step_ms"] / alone
        if "step_ms" in row and default:
            row["speedup_vs_default"] = default / row["step_ms"]
    return rows


COLS = [
    ("size", "size", ""),
    ("policy", "wait policy", ""),
    ("threads", "threads", ""),
    ("setting", "setting", ""),
    ("step_ms", "ms/step", ".1f"),
    ("mm_us", "[128,64]x[64,64] mm us", ".1f"),
    ("vs_alone", "x its time alone", ".2f"),
    ("speedup_vs_default", "speed-up vs PASSIVE, 2 threads, alone", ".2f"),
    ("note", "note", ""),
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = {n: SIZES[n] for n in args.sizes}
    if args.quick:
        sizes = QUICK_SIZE
        args.sizes, args.policies, args.threads, args.settings = list(QUICK_SIZE), ["PASSIVE"], [1], SETTINGS
        args.rounds, args.seconds = 1, 0.3
    for key in ("sizes", "policies", "threads", "settings"):  # a choice given twice runs once
        setattr(args, key, list(dict.fromkeys(getattr(args, key))))
    if min(args.threads) < 1 or args.rounds < 1 or args.seconds <= 0 or args.timeout <= 0:
        print("bench_threads: --threads, --rounds, --seconds and --timeout must be positive", file=sys.stderr)
        return 2
    watch = LoadWatch("bench_threads")
    info = machine_info(max(args.threads))
    rows = []
    for name, size in sizes.items():
        shape = f"N={size['N']} M={size['M']} D={size['D']} L={size['L']} B={size['batch']}"
        print(f"\n{name}: {shape}", flush=True)
        rows += measure(args, name, size)
    load = watch.finish()
    head = (
        f"training step, fp32, torch {info['torch']}, {info['cores']} cores; medians of {args.rounds} "
        f"alternating rounds of {args.seconds:g} s processes; load average {load['load_average_start']} -> "
        f"{load['load_average_end']}"
    )
    name = "bench_threads_quick" if args.quick else result_name(args)
    title = f"OpenMP wait policy and threads ({head})"
    report_table(name, title, rows, COLS, {"machine": info, **load, "args": vars(args)})
    plot(name, rows, list(sizes))
    return 0


def result_name(args: argparse.Namespace) -> str:
    """``bench_threads`` for the default cases, rounds and seconds; any other run never replaces its files."""
    defaults = build_parser().parse_args([])
    chosen = ("sizes", "policies", "threads", "settings")
    full = all(sorted(getattr(args, k)) == sorted(getattr(defaults, k)) for k in chosen)
    full = full and (args.rounds, args.seconds) == (defaults.rounds, defaults.seconds)
    return "bench_threads" if full else "bench_threads_partial"


def plot(name: str, rows: list[dict], sizes: list[str]) -> None:
    fig, axes = new_figure(ncols=len(sizes), figsize=(6.5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        settings = grouped_bars(
            ax,
            [r for r in rows if r["size"] == size],
            group=lambda r: r["setting"],
            series=lambda r: (r["policy"], r["threads"]),
            value="step_ms",
            label=lambda v: f"{v[0]}, {v[1]} thr",
        )
        ax.set_xticks(range(len(settings)), settings, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per training step (lower is better)")
        ax.set_title(f"{size}: OpenMP wait policy and threads")
        ax.legend(fontsize=7)
    save_figure(fig, name)


if __name__ == "__main__":
    script_main(run_one, main)
