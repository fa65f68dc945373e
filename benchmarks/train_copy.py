"""Train Perceiver AR on the copy task on CPU and report mirrored-half accuracy by distance.

Every step draws fresh copy sequences (as the official loader does: the data
is unlimited), the model uses absolute sinusoidal positions (as the official
copy configs do) and by default M = h + 1 latents, so every latent sits on
an input whose next token is a mirrored one (or EOS) and none is wasted on the
unpredictable first half. Training stops when the held-out accuracy reaches
``--target`` or the training-time budget runs out; the model is saved with
``save_pretrained``.

``--curriculum centre`` is what takes the task past N = 1024 on this CPU
(docs/long_context.md says why): it trains on windows of the N-sequence
centred on the mirror point, at their absolute positions, from
``--start-width`` events, doubling the width whenever the running training
accuracy reaches ``--grow-at``; ``--targets-per-step`` keeps the number of
mirrored targets per step constant across widths. The evaluation is always
the official one: whole sequences of N events, the mirrored half, by copy
distance (``perceiver_ar.copy_task.copy_accuracy``).

    python benchmarks/train_copy.py --length 4096 --curriculum centre --targets-per-step 4096 --minutes 60
    python benchmarks/train_copy.py --length 1024 --minutes 60 --out runs/copy-1024  # no curriculum, ~12 min
    python benchmarks/train_copy.py --quick      # a few steps, smoke test

It reports the training time, the wall time (evaluations included), the
process CPU time and the load average at start and end (the machine is
shared: wall time alone says little), the learning curve and the accuracy
by distance, as JSON and PNG in benchmarks/results/train_copy_N.{json,png}.
This is the issue-5/14 experiment loop (fresh data every step,
accuracy-based stopping); general training on prepared stores is
``perceiver-ar train``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import RESULTS_DIR, machine_info, new_figure, save_figure, save_results, set_threads


def copy_model_config(args: argparse.Namespace) -> dict:
    h = (args.length - 2) // 2
    return dict(
        vocab_size=259,
        context_len=args.length,
        num_latents=min(args.latents or h + 1, args.length - 1),
        input_dim=args.width,
        latent_dim=args.width,
        num_latent_layers=args.layers,
        cross_attend_heads=args.heads,
        latent_heads=args.heads,
        position_encoding="absolute",
        absolute_table="sinusoidal",
        dropout=args.dropout,
        final_layer_init_zeros=bool(args.zero_init_logits),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a named model preset (its context_len is N)")
    p.add_argument("--length", type=int, default=1024, help="events per copy sequence N")
    p.add_argument("--latents", type=int, default=0, help="M (default h + 1: the mirrored half)")
    p.add_argument("--width", type=int, default=128, help="E = D")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1, help="latent layers L")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--zero-init-logits", type=int, default=1, help="1: the official zero-initialised logits layer"
    )
    p.add_argument("--batch", type=int, default=8, help="sequences per step (see --targets-per-step)")
    p.add_argument(
        "--targets-per-step",
        type=int,
        default=0,
        help="rows per step = max(1, this // latents per row), at every window width (0: --batch rows)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--min-crop",
        type=int,
        default=0,
        help="train on random prefixes of >= this many events (official crops; 0 = full rows)",
    )
    p.add_argument(
        "--curriculum",
        choices=["none", "centre"],
        default="none",
        help="centre: windows centred on the mirror point, doubling from --start-width",
    )
    p.add_argument(
        "--start-width", type=int, default=64, help="first window width (events) of the curriculum"
    )
    p.add_argument(
        "--grow-at", type=float, default=0.97, help="double the window at this running training accuracy"
    )
    p.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument(
        "--eval-every", type=int, default=100, help="held-out check every this many steps on whole sequences"
    )
    p.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences for the periodic check")
    p.add_argument("--final-sequences", type=int, default=256, help="held-out sequences for the final report")
    p.add_argument("--target", type=float, default=0.995, help="stop once the periodic accuracy reaches this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="model directory to write (default runs/copy-N)")
    p.add_argument("--quick", action="store_true", help="a few tiny steps, smoke test")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot run, with the fix in one line."""
    from perceiver_ar.copy_task import half_length

    half_length(args.length)  # even and >= 4
    for name in ("batch", "eval_every", "eval_sequences", "final_sequences", "max_steps", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.targets_per_step < 0 or args.minutes <= 0:
        raise ValueError("--targets-per-step must be >= 0 and --minutes > 0")
    if args.curriculum != "none" and args.min_crop:
        raise ValueError("--min-crop crops whole sequences: use it without --curriculum")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.length, args.width, args.heads, args.layers, args.batch = 64, 32, 2, 1, 4
        args.max_steps, args.eval_every, args.eval_sequences, args.final_sequences = 12, 4, 4, 4
        if args.curriculum != "none":
            # Grow every 5 steps whatever the accuracy: 16, 32, then the whole 64.
            args.start_width, args.grow_at, args.targets_per_step = 16, 0.0, 64
    try:
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return train(args)


def train(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from perceiver_ar.config import PerceiverARConfig
    from perceiver_ar.copy_task import (
        WidthCurriculum,
        centred_windows,
        copy_accuracy,
        copy_sequences,
        training_crops,
    )
    from perceiver_ar.loss import latent_labels, perceiver_ar_loss, shift_events
    from perceiver_ar.model import PerceiverAR

    wall_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.preset and not args.quick:
        cfg = PerceiverARConfig.from_preset(args.preset)
        args.length = cfg.context_len
    else:
        cfg = PerceiverARConfig(**copy_model_config(args))
    N = args.length
    model = PerceiverAR(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng([args.seed, N, 1])
    held_out = copy_sequences(args.final_sequences, N, np.random.default_rng([args.seed, N, 2]))
    gen = torch.Generator().manual_seed(args.seed)
    curriculum = None
    if args.curriculum == "centre":
        curriculum = WidthCurriculum(N, start_width=args.start_width, grow_at=args.grow_at)
    budget = args.minutes * 60.0
    print(
        f"copy N={N}: M={cfg.num_latents} E=D={cfg.input_dim} L={cfg.num_latent_layers} "
        f"heads={cfg.cross_attend_heads} lr={args.lr} threads={threads} curriculum={args.curriculum} "
        f"{model.num_parameters():,} params; load average {load_start[0]:.2f} {load_start[1]:.2f} "
        f"{load_start[2]:.2f}",
        flush=True,
    )

    def lr_at(step: int) -> float:
        # Linear warm-up, then constant: the run stops on accuracy, not on a schedule.
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr

    def evaluate(step: int, width: int, loss: float) -> dict:
        acc = copy_accuracy(model, held_out[: args.eval_sequences], batch_size=4)
        entry = {
            "step": step,
            "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "width": width,
            "loss": loss,
            "accuracy": acc.accuracy,
            "load_average_1min": os.getloadavg()[0],
        }
        print(
            f"step {step:>6}  {train_seconds / 60:6.1f} min  width {width:>6}  ce {loss:.4f}  "
            f"held-out acc {100 * acc.accuracy:6.2f}%",
            flush=True,
        )
        return entry

    steps_log: list[dict] = []  # every training step
    evals: list[dict] = []  # held-out accuracy on whole sequences of N events
    growths: list[dict] = []  # when each window width was left
    train_seconds = 0.0
    train_cpu_seconds = 0.0
    step = 0
    reached = False
    while step < args.max_steps and train_seconds < budget:
        t0, c0 = time.perf_counter(), time.process_time()
        width = curriculum.width if curriculum else N
        # Latents per row: the mirrored half of the window (all M at the whole sequence).
        m = min(cfg.num_latents, width // 2) if curriculum else cfg.num_latents
        rows = max(1, args.targets_per_step // m) if args.targets_per_step else args.batch
        if curriculum:
            events, positions = (torch.from_numpy(a) for a in centred_windows(rows, N, width, rng))
            inputs, targets, positions = events[:, :-1], events[:, 1:], positions[:, :-1]
            full_rows = True
        else:
            events = torch.from_numpy(copy_sequences(rows, N, rng))
            if args.min_crop:
                events = training_crops(events, args.min_crop, gen)
            inputs, targets = shift_events(events)
            positions = None
            full_rows = None if args.min_crop else True  # crops pad their rows
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(inputs, positions=positions, num_latents=m, full_rows=full_rows)
        loss = perceiver_ar_loss(out.logits, targets, out.latent_index, cfg.z_loss)
        opt.zero_grad(set_to_none=True)
        loss.mean.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        with torch.no_grad():
            hits = (out.logits.argmax(-1) == latent_labels(targets, out.latent_index)) & loss.mask
            train_acc = float(hits.sum() / loss.mask.sum().clamp(min=1))
        train_seconds += time.perf_counter() - t0
        train_cpu_seconds += time.process_time() - c0
        step += 1
        ce = loss.mean_ce.item()
        steps_log.append(
            {
                "step": step,
                "train_seconds": train_seconds,
                "width": width,
                "rows": rows,
                "ce": ce,
                "accuracy": train_acc,
                "grad_norm": grad_norm,
            }
        )
        if step % 25 == 0:
            print(
                f"step {step:>6}  {train_seconds / 60:6.1f} min  width {width:>6} x {rows:<4} ce {ce:.4f}  "
                f"training acc {100 * train_acc:6.2f}%",
                flush=True,
            )
        if curriculum and curriculum.update(train_acc):
            # Where the whole-sequence accuracy stands when a width is mastered (cheap: a few evals).
            evals.append(evaluate(step, width, ce))
            growths.append({"width": width, "step": step, "train_seconds": train_seconds})
            print(f"  window {width} -> {curriculum.width} at step {step}", flush=True)
            continue
        if width == N and (step % args.eval_every == 0 or step == args.max_steps):
            evals.append(evaluate(step, width, ce))
            if evals[-1]["accuracy"] >= args.target:
                reached = True
                break

    final = copy_accuracy(model, held_out, batch_size=4)
    print(final.table())
    out_dir = Path(args.out or f"runs/copy-{N}")
    model.save_pretrained(str(out_dir))
    wall_seconds = time.perf_counter() - wall_start
    cpu_seconds = time.process_time() - cpu_start
    load_end = os.getloadavg()
    name = "train_copy_quick" if args.quick else f"train_copy_{N}"
    payload = {
        "machine": machine_info(threads),
        "args": vars(args),
        "config": cfg.to_dict(),
        "steps": step,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "wall_seconds": wall_seconds,
        "cpu_seconds": cpu_seconds,
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "reached_target": reached,
        "final": final.to_dict(),
        "growths": growths,
        "evals": evals,
        "steps_log": steps_log,
        "model_dir": str(out_dir),
    }
    save_results(name, payload)
    (out_dir / "copy_result.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(name, payload)
    (RESULTS_DIR / f"{name}.md").write_text(markdown(payload))
    print(
        f"{step} steps; training {train_seconds:.0f} s ({train_cpu_seconds:.0f} s CPU); "
        f"wall {wall_seconds:.0f} s ({cpu_seconds:.0f} s process CPU, evaluations included); "
        f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
        f"final accuracy {100 * final.accuracy:.2f}% at N={N}; model in {out_dir}"
    )
    return 0


def markdown(payload: dict) -> str:
    """The run as the docs show it: times and load, each window width, accuracy by copy distance."""
    final = payload["final"]
    load0, load1 = payload["load_average_start"], payload["load_average_end"]
    p, machine = payload, payload["machine"]
    lines = [
        f"copy N = {final['length']}: **{100 * final['accuracy']:.2f}%** on the mirrored half "
        f"({final['num_sequences']} held-out sequences, {final['total']:,} tokens) "
        f"after {p['steps']:,} steps; "
        f"training {p['train_seconds'] / 60:.1f} min wall ({p['train_cpu_seconds'] / 60:.1f} min CPU), "
        f"whole run {p['wall_seconds'] / 60:.1f} min wall ({p['cpu_seconds'] / 60:.1f} min CPU) "
        f"with the evaluations; load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at end; "
        f"{machine['threads']} thread(s), torch {machine['torch']}, {machine['time_utc']}.",
        "",
    ]
    if payload["growths"]:
        lines += [
            "| window width | steps | rows per step | training min at the end of the width "
            "| training accuracy, first 3 steps | held-out accuracy at N at the end |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        evals_at = {e["step"]: e["accuracy"] for e in payload["evals"]}
        log = payload["steps_log"]
        for width in dict.fromkeys(e["width"] for e in log):
            seg = [e for e in log if e["width"] == width]
            first = sum(e["accuracy"] for e in seg[:3]) / min(3, len(seg))
            left = evals_at.get(seg[-1]["step"]) if width != final["length"] else final["accuracy"]
            left_s = "-" if left is None else f"{100 * left:.2f}%"
            lines.append(
                f"| {width:,} | {len(seg)} | {seg[0]['rows']} | {seg[-1]['train_seconds'] / 60:.1f} "
                f"| {100 * first:.1f}% | {left_s} |"
            )
        lines.append("")
    lines += ["| copy distance | accuracy | tokens |", "|---:|---:|---:|"]
    for b in final["buckets"]:
        lines.append(
            f"| {int(b['lo']):,}-{int(b['hi']):,} | {100 * b['accuracy']:.2f}% | {int(b['total']):,} |"
        )
    lines.append(f"| **all** | **{100 * final['accuracy']:.2f}%** | {final['total']:,} |")
    return "\n".join(lines) + "\n"


def plot(name: str, payload: dict) -> None:
    """Learning curve (training accuracy at each width, held-out accuracy at N) and accuracy by distance."""
    N = payload["config"]["context_len"]
    fig, (ax1, ax2) = new_figure(ncols=2, figsize=(11, 4.4))
    log = payload["steps_log"]
    if log:
        acc = [100 * e["accuracy"] for e in log]
        k = 10  # running mean over 10 steps
        smooth = [sum(acc[max(0, i - k + 1) : i + 1]) / min(k, i + 1) for i in range(len(acc))]
        ax1.plot(
            [e["train_seconds"] / 60 for e in log],
            smooth,
            lw=1,
            color="tab:gray",
            label="training accuracy in the current window (10-step mean)",
        )
    if payload["evals"]:
        ax1.plot(
            [e["train_seconds"] / 60 for e in payload["evals"]],
            [100 * e["accuracy"] for e in payload["evals"]],
            marker="o",
            color="tab:blue",
            label=f"held-out accuracy, whole sequences (N={N})",
        )
    for g in payload["growths"]:
        x = g["train_seconds"] / 60
        ax1.axvline(x, color="tab:orange", lw=0.6, alpha=0.6)
        ax1.text(x, 2, f" {g['width']}", rotation=90, fontsize=6, color="tab:orange", va="bottom")
    ax1.set_xlabel("training time (min); orange: end of each window width")
    ax1.set_ylabel("mirrored-half accuracy (%)")
    ax1.set_ylim(0, 101)
    ax1.set_title(f"copy N={N}: {payload['train_seconds'] / 60:.1f} min of training")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax1.grid(alpha=0.3)
    buckets = payload["final"]["buckets"]
    labels = [f"{int(b['lo'])}-{int(b['hi'])}" for b in buckets]
    ax2.bar(range(len(labels)), [100 * b["accuracy"] for b in buckets])
    ax2.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    ax2.set_xlabel("copy distance")
    ax2.set_ylabel("accuracy (%)")
    lowest = min((100 * b["accuracy"] for b in buckets), default=0.0)
    ax2.set_ylim(0 if lowest < 50 else 10 * int(lowest // 10) - 10, 100)  # zoom in on a good run
    ax2.set_title(
        f"after {payload['steps']} steps: {100 * payload['final']['accuracy']:.2f}% "
        f"({payload['final']['num_sequences']} sequences)"
    )
    save_figure(fig, name, RESULTS_DIR)


if __name__ == "__main__":
    sys.exit(main())
