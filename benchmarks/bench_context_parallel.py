"""Peak memory per rank of one context-parallel training step vs N (``--context-parallel K``).

Each case runs K fresh processes (gloo, one rank each, as torchrun would
start them) that split one row of N inputs between them and take one
training step (forward, loss, backward with DDP's gradient all-reduce, AdamW).
Each rank reports its peak resident memory (``ru_maxrss``, Python and torch
included). The parent polls the resident memory of all K together and kills
the case past ``--memory-limit-gb``; before a case it predicts the need from
the cases so far (linear in N) and skips one that would not fit in that
limit or in the memory the machine has available then, so other users of a
shared machine are not starved. ``--baseline-max``: one process (K = 1) up
to this N, for comparison. Default sizes: M = 1024, E = D = 512, L = 6,
8 heads, rotary, batch 1, full rows.

    python benchmarks/bench_context_parallel.py                 # N = 65k .. 1M, K = 2
    python benchmarks/bench_context_parallel.py --quick         # seconds, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from common import (
    CASE_MARK,
    _rss_of,
    format_table,
    machine_info,
    markdown_table,
    new_figure,
    peak_rss_mb,
    save_figure,
    save_results,
    script_main,
)


def run_rank(case: dict) -> dict:
    """One rank of a case: the training step on this rank's slice of the row."""
    import torch
    import torch.distributed as dist
    from common import build_model, random_batch

    from perceiver_ar.context_parallel import ContextParallel
    from perceiver_ar.loss import perceiver_ar_loss

    torch.set_num_threads(case["threads"])
    K = case["cp"]
    if K > 1:
        dist.init_process_group("gloo")
    model = build_model(case["config"])
    inputs, targets = random_batch(1, case["config"]["context_len"])
    forward = model
    if K > 1:
        forward = torch.nn.parallel.DistributedDataParallel(ContextParallel(model, dist.group.WORLD))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    out = forward(inputs, full_rows=True, validate=False)
    loss = perceiver_ar_loss(out.logits, targets, out.latent_index).mean
    loss.backward()  # DDP averages over the K ranks, each of which holds the whole loss
    opt.step()
    seconds = time.perf_counter() - t0
    result = {
        "seconds": seconds,
        "loss": float(loss),
        "rss_before_mb": rss_before,
        "torch": torch.__version__,
    }
    if K > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_mb() -> float:
    """MemAvailable of the machine, in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def run_ranks(case: dict, limit_mb: float, timeout: float) -> dict:
    """Start the K ranks of a case, watch their total memory, gather their reports."""
    K = case["cp"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(__file__), env.get("PYTHONPATH")) if p)
    procs = []
    for rank in range(K):
        env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(K), LOCAL_WORLD_SIZE=str(K))
        cmd = [sys.executable, __file__, "--case", json.dumps(case)]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_r)
        )
    t0, killed, top = time.monotonic(), None, 0.0
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        total = sum(_rss_of(p.pid) for p in procs)
        top = max(top, total)
        if time.monotonic() - t0 > timeout:
            killed = f"timed out after {timeout:.0f} s"
        elif total > limit_mb:
            killed = f"does not fit: over {limit_mb / 1024:.1f} GB resident in all"
        if killed:
            for p in procs:
                p.kill()
            break
    outputs = [p.communicate() for p in procs]
    if killed:
        return {"error": killed}
    reports = []
    for (stdout, stderr), p in zip(outputs, procs, strict=True):
        lines = [ln for ln in stdout.splitlines() if ln.startswith(CASE_MARK)]
        if not lines:
            tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])[-300:]
            return {"error": f"failed (exit {p.returncode}): {tail}"}
        reports.append(json.loads(lines[0][len(CASE_MARK) :]))
    peaks = [r["peak_rss_mb"] / 1024 for r in reports]
    return {
        "peak_gb_per_rank": max(peaks),
        "peak_gb_ranks": peaks,
        "peak_gb_total_polled": top / 1024,
        "seconds": max(r["seconds"] for r in reports),
        "loss": reports[0]["loss"],
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--contexts", type=int, nargs="+", default=[65536, 131072, 262144, 524288, 1048576])
    p.add_argument("--cp", type=int, default=2, help="processes sharing each row (K)")
    p.add_argument("--baseline-max", type=int, default=131072, help="also one process (K = 1) up to this N")
    p.add_argument("--latents", type=int, default=1024)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--memory-limit-gb", type=float, default=22.0, help="all ranks of a case together")
    p.add_argument("--reserve-gb", type=float, default=1.0, help="memory left to others: skip a case above")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    return p


def predict_mb(done: list[dict], n: int, K: int) -> float | None:
    """Total memory of K ranks at context n, linear through the last two cases of this K."""
    pts = [(r["N"], r["peak_gb_per_rank"] * 1024) for r in done if r["K"] == K and "peak_gb_per_rank" in r]
    if len(pts) < 2:
        return None
    (n0, m0), (n1, m1) = pts[-2:]
    return K * (m1 + (m1 - m0) / (n1 - n0) * (n - n1))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.contexts, args.latents, args.width, args.heads, args.layers = [256], 64, 32, 2, 1
        args.baseline_max = 256
    rows: list[dict] = []
    for n in args.contexts:
        for K in sorted({1, args.cp} if n <= args.baseline_max else {args.cp}):
            config = dict(
                context_len=n,
                num_latents=min(args.latents, n),
                input_dim=args.width,
                latent_dim=args.width,
                num_latent_layers=args.layers,
                cross_attend_heads=args.heads,
                latent_heads=args.heads,
            )
            case = {"config": config, "cp": K, "threads": args.threads}
            row = {"N": n, "K": K, "free_gb": available_mb() / 1024, "load": os.getloadavg()[0]}
            need = predict_mb(rows, n, K)
            room = min(args.memory_limit_gb * 1024, available_mb() - args.reserve_gb * 1024)
            if need is not None and need > room:
                row["error"] = f"not run: needs ~{need / 1024:.1f} GB, {room / 1024:.1f} GB free to use"
            else:
                row.update(run_ranks(case, room, args.timeout))
            if "peak_gb_per_rank" in row:
                row["inputs_per_rank"] = n // K
            rows.append(row)
            print(
                f"N={n:>8} K={K}: "
                + (
                    f"{row['peak_gb_per_rank']:.2f} GB per rank, {row['seconds']:.0f} s"
                    if "error" not in row
                    else row["error"]
                )
                + f" (machine: {row['free_gb']:.1f} GB available before, load {row['load']:.1f})",
                flush=True,
            )

    cols = [
        ("N", "N", ","),
        ("K", "K", ""),
        ("inputs_per_rank", "inputs per rank", ","),
        ("peak_gb_per_rank", "peak GB per rank", ".2f"),
        ("peak_gb_total_polled", "all ranks GB (polled)", ".2f"),
        ("seconds", "step s", ".0f"),
        ("free_gb", "GB available before", ".1f"),
        ("load", "load before", ".1f"),
        ("error", "note", ""),
    ]
    print()
    print(format_table(rows, cols))
    name = "bench_context_parallel" + ("_quick" if args.quick else "")
    save_results(
        name,
        {
            "machine": machine_info(args.threads),
            "args": vars(args),
            "rows": rows,
            "markdown": markdown_table(rows, cols),
        },
    )

    fig, ax = new_figure(figsize=(6, 4))
    for K in sorted({r["K"] for r in rows}):
        pts = [(r["N"], r["peak_gb_per_rank"]) for r in rows if r["K"] == K and "peak_gb_per_rank" in r]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), marker="o", label=f"K = {K}" + (" (one process)" if K == 1 else "")
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context N (one row)")
    ax.set_ylabel("peak RSS per rank (GB)")
    ax.set_title(f"Context parallelism: memory per rank, M = {args.latents}, E = D = {args.width}")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    script_main(run_rank, main)
