"""Train Perceiver AR on the copy task on CPU and report mirrored-half accuracy by distance.

Every step draws fresh copy sequences (as the official loader does: the data
is unlimited), the model uses absolute sinusoidal positions (as the official
copy configs do) and by default M = h + 1 latents, so every latent sits on
an input whose next token is a mirrored one (or EOS) and none is wasted on the
unpredictable first half. Training stops when the held-out accuracy reaches
``--target`` or the time budget runs out; the model is saved with
``save_pretrained``.

    python benchmarks/train_copy.py --length 1024 --minutes 60 --out runs/copy-1024  # ~12 min here
    python benchmarks/train_copy.py --quick      # a few steps, smoke test

This is the issue-5 experiment loop (fresh data every step, accuracy-based
stopping); general training on prepared stores is ``perceiver-ar train``.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--min-crop",
        type=int,
        default=0,
        help="train on random prefixes of >= this many events (official crops; 0 = full rows)",
    )
    p.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences for the periodic check")
    p.add_argument("--final-sequences", type=int, default=256, help="held-out sequences for the final report")
    p.add_argument("--target", type=float, default=0.995, help="stop once the periodic accuracy reaches this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="model directory to write (default runs/copy-N)")
    p.add_argument("--quick", action="store_true", help="a few tiny steps, smoke test")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.length, args.width, args.heads, args.layers, args.batch = 64, 32, 2, 1, 4
        args.max_steps, args.eval_every, args.eval_sequences, args.final_sequences = 6, 3, 4, 4

    import numpy as np
    import torch

    from perceiver_ar.config import PerceiverARConfig
    from perceiver_ar.copy_task import copy_accuracy, copy_sequences, training_crops
    from perceiver_ar.loss import perceiver_ar_loss, shift_events
    from perceiver_ar.model import PerceiverAR

    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.preset and not args.quick:
        cfg = PerceiverARConfig.from_preset(args.preset)
        args.length = cfg.context_len
    else:
        cfg = PerceiverARConfig(**copy_model_config(args))
    model = PerceiverAR(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng([args.seed, args.length, 1])
    held_out = copy_sequences(
        args.final_sequences, args.length, np.random.default_rng([args.seed, args.length, 2])
    )
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    print(
        f"copy N={args.length}: M={cfg.num_latents} E=D={cfg.input_dim} L={cfg.num_latent_layers} "
        f"heads={cfg.cross_attend_heads} batch={args.batch} lr={args.lr} threads={threads} "
        f"{model.num_parameters():,} params",
        flush=True,
    )

    def lr_at(step: int) -> float:
        # Linear warm-up, then constant: the run stops on accuracy, not on a schedule.
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr

    log = []
    train_seconds = 0.0
    step = 0
    reached = False
    while step < args.max_steps and train_seconds < budget:
        t0 = time.perf_counter()
        events = torch.from_numpy(copy_sequences(args.batch, args.length, rng))
        if args.min_crop:
            events = training_crops(events, args.min_crop, gen)
        inputs, targets = shift_events(events)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(inputs)
        loss = perceiver_ar_loss(out.logits, targets, out.latent_index, cfg.z_loss)
        opt.zero_grad(set_to_none=True)
        loss.mean.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        train_seconds += time.perf_counter() - t0
        step += 1
        if step % args.eval_every == 0 or step == args.max_steps:
            acc = copy_accuracy(model, held_out[: args.eval_sequences], batch_size=args.batch)
            entry = {
                "step": step,
                "train_seconds": train_seconds,
                "loss": loss.mean_ce.item(),
                "grad_norm": grad_norm,
                "accuracy": acc.accuracy,
            }
            log.append(entry)
            print(
                f"step {step:>6}  {train_seconds / 60:6.1f} min  ce {entry['loss']:.4f}  "
                f"acc {100 * acc.accuracy:6.2f}%",
                flush=True,
            )
            if acc.accuracy >= args.target:
                reached = True
                break

    final = copy_accuracy(model, held_out, batch_size=args.batch)
    print(final.table())
    out_dir = Path(args.out or f"runs/copy-{args.length}")
    model.save_pretrained(str(out_dir))
    name = "train_copy_quick" if args.quick else f"train_copy_{args.length}"
    payload = {
        "machine": machine_info(threads),
        "args": vars(args),
        "config": cfg.to_dict(),
        "steps": step,
        "train_seconds": train_seconds,
        "reached_target": reached,
        "final": final.to_dict(),
        "log": log,
        "model_dir": str(out_dir),
    }
    save_results(name, payload)
    (out_dir / "copy_result.json").write_text(json.dumps(payload, indent=2) + "\n")

    fig, (ax1, ax2) = new_figure(ncols=2, figsize=(10, 3.8))
    if log:
        ax1.plot([e["train_seconds"] / 60 for e in log], [100 * e["accuracy"] for e in log], marker=".")
    ax1.set_xlabel("training time (min)")
    ax1.set_ylabel("mirrored-half accuracy (%)")
    ax1.set_title(f"copy N={args.length}: accuracy during training")
    ax1.grid(alpha=0.3)
    labels = [f"{int(b['lo'])}-{int(b['hi'])}" for b in final.buckets]
    ax2.bar(range(len(labels)), [100 * b["accuracy"] for b in final.buckets])
    ax2.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    ax2.set_xlabel("copy distance")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title(f"after {step} steps, {train_seconds / 60:.1f} min")
    save_figure(fig, name, RESULTS_DIR)
    print(
        f"{step} steps, {train_seconds:.0f} s of training; final accuracy {100 * final.accuracy:.2f}%; "
        f"model in {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
