"""Perceiver AR against the plain decoder-only Transformer at the same training time, on real data.

For each modality store (Fashion-MNIST, the Bach chorales, the asterisk
audio), two models train with one loop, one sampler, one optimizer and one
learning-rate schedule, the recipes of the README:

- ``par``: Perceiver AR, E = D = 128, L = 4 (the ``demo`` preset resized),
  N and M per modality, for the recipe's number of steps; its training time
  (batches included, evaluation excluded) is the budget;
- ``plain``: ``benchmarks/plain_decoder.py`` with the same width, heads,
  MLP, vocabulary and L + 1 blocks (a pre-LN decoder over all N positions,
  SDPA's causal flash kernel, rotary over the flat sequence), trained on the
  same crops for as many steps as fit in the budget: its step time is
  measured on a throwaway copy first, the step count follows, and the
  warm-up is scaled by the same factor so that it reaches the peak
  learning rate too. Its loss counts every position, the Perceiver AR's
  the M latents.

Both are then scored on the store's test split with the library's block
protocol (``perceiver_ar.evaluate``) at the same block of M targets per
forward, so every target sees the same context in both; the decoder is
scored through ``plain_decoder.to_perceiver_ar``, which computes the same
function (tests/test_baselines.py). Each model trains in a fresh process,
one after the other; the load average is printed at the start and the end.
All three take ~30 min here. A training run is one sample, not a median: its quality says how far each
model gets in the same minutes of this CPU, not where it would end.

    perceiver-ar prepare image --dataset fashion-mnist --out data/fmnist
    perceiver-ar prepare music --default --out data/bach
    perceiver-ar prepare audio --default --out data/asterisk
    python benchmarks/bench_equal_time.py --fmnist data/fmnist --bach data/bach --asterisk data/asterisk
    python benchmarks/bench_equal_time.py --quick        # a tiny copy-task store, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import (
    LoadWatch,
    machine_info,
    new_figure,
    report_table,
    run_case,
    save_figure,
    script_main,
    set_threads,
)

# N, M, position encoding, steps, warm-up and the test tokens scored (None: the whole split).
RECIPES = {
    "fmnist": dict(
        context_len=785,
        num_latents=128,
        modality="image",
        position_encoding="absolute",
        steps=650,
        warmup=50,
        eval_tokens=156_800,
        label="Fashion-MNIST, bits/dim, first 200 test images",
    ),
    "bach": dict(
        context_len=1024,
        num_latents=128,
        modality="music",
        position_encoding="rotary",
        steps=450,
        warmup=40,
        eval_tokens=None,
        label="Bach chorales, bits/event, 41 held-out pieces",
    ),
    "asterisk": dict(
        context_len=2048,
        num_latents=256,
        modality="audio",
        position_encoding="rotary",
        steps=300,
        warmup=30,
        eval_tokens=131_072,
        label="asterisk audio, bits/sample, 16 s of the test file",
    ),
}
QUICK_RECIPE = dict(
    context_len=64,
    num_latents=16,
    modality="copy",
    position_encoding="rotary",
    steps=6,
    warmup=2,
    eval_tokens=256,
    label="copy task (smoke test)",
)
WIDTH, HEADS, LAYERS, BATCH, LR = 128, 4, 4, 16, 2e-3


def train_config(recipe: dict, data: str, batch: int):
    from perceiver_ar.train_config import TrainConfig

    model = dict(
        context_len=recipe["context_len"],
        num_latents=recipe["num_latents"],
        input_dim=WIDTH,
        latent_dim=WIDTH,
        num_latent_layers=LAYERS,
        cross_attend_heads=HEADS,
        latent_heads=HEADS,
        position_encoding=recipe["position_encoding"],
    )
    return TrainConfig(
        data=data,
        preset="demo",
        model=model,
        steps=recipe["steps"],
        warmup_steps=recipe["warmup"],
        batch_size=batch,
        lr=LR,
    )


def build(kind: str, cfg, store):
    """(model, loss(inputs, targets, positions, full_rows), the PerceiverARConfig the recipe gives this data).

    The decoder takes its sizes from that config; the batch checks use it for both.
    """
    import torch
    import torch.nn.functional as F

    from perceiver_ar.loss import perceiver_ar_loss
    from perceiver_ar.model import PerceiverAR
    from perceiver_ar.train_config import build_model_config
    from perceiver_ar.vocab import PAD_ID

    torch.manual_seed(cfg.seed)
    model_cfg = build_model_config(cfg, store)
    if kind == "par":
        model = PerceiverAR(model_cfg)

        def loss_fn(inputs, targets, positions, full_rows):
            out = model(inputs, positions, full_rows=full_rows, validate=False)
            return perceiver_ar_loss(out.logits, targets, out.latent_index, model_cfg.z_loss).mean

        return model, loss_fn, model_cfg
    from plain_decoder import DecoderConfig, PlainDecoder

    model = PlainDecoder(
        DecoderConfig(
            vocab_size=model_cfg.vocab_size,
            context_len=model_cfg.context_len,
            dim=model_cfg.latent_dim,
            num_heads=model_cfg.latent_heads,
            num_blocks=model_cfg.num_latent_layers + 1,
            widening=model_cfg.latent_widening,
        )
    )

    def plain_loss(inputs, targets, positions, full_rows):
        # Right padding only follows a row's events, and attention is causal: padding changes no valid logit.
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID)

    return model, plain_loss, model_cfg


def train_loop(cfg, store, model, loss_fn, model_cfg, steps: int, warmup: int) -> dict:
    """``steps`` optimizer steps as the trainer takes them: crops, AdamW, warm-up + cosine, clipping."""
    import dataclasses

    import torch

    from perceiver_ar.loss import shift_events
    from perceiver_ar.samplers import check_batch, crops_to_batch, make_sampler
    from perceiver_ar.train import lr_at, make_optimizer

    run_cfg = dataclasses.replace(cfg, steps=steps, warmup_steps=warmup)
    N, M = model_cfg.context_len, model_cfg.num_latents
    split = store.split("train")
    sampler = make_sampler(cfg.sampler, split, N, M, cfg.seed)  # the same crops for both models
    optimizer = make_optimizer(run_cfg, model)
    model.train()
    losses, step_times = [], []
    start = time.perf_counter()
    for step in range(steps):
        t = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(run_cfg, step)
        events, positions = crops_to_batch(split, store.meta, sampler.crops(step, cfg.batch_size), N)
        full_rows = check_batch(events, positions, model_cfg)
        inputs, targets = shift_events(torch.from_numpy(events))
        loss = loss_fn(inputs, targets, torch.from_numpy(positions), full_rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        step_times.append(time.perf_counter() - t)
    return {
        "train_s": time.perf_counter() - start,
        "steps": steps,
        "losses": losses,
        "step_times": step_times,
    }


def score(kind: str, model, recipe: dict, store) -> dict:
    """Test bits per token, block protocol, M targets a forward; and the unigram's on the same targets."""
    from perceiver_ar.evaluate import evaluate, unigram_log2p

    meta = dict(store.meta)
    if kind == "plain":
        from plain_decoder import to_perceiver_ar

        model = to_perceiver_ar(model)
        if meta.get("modality") == "image":
            meta["image_positions"] = "flat"  # the decoder's rotary runs over the flat sequence
    split = "test" if "test" in store.split_names else "validation"
    return evaluate(
        model.eval(),
        store.split(split),
        protocol="block",
        block_size=recipe["num_latents"],
        meta=meta,
        max_tokens=recipe["eval_tokens"],
        baseline_log2p=unigram_log2p(store.split("train"), store.vocab_size),
    )


def run_one(case: dict) -> dict:
    import torch

    from perceiver_ar.store import TokenStore

    threads = set_threads(case["threads"])
    recipe = case["recipe"]
    store = TokenStore(case["data"])
    cfg = train_config(recipe, case["data"], case["batch"])
    model, loss_fn, model_cfg = build(case["kind"], cfg, store)
    steps, warmup, calibration = recipe["steps"], recipe["warmup"], None
    if case.get("budget_s") is not None:
        # As many steps as fit in the budget: time a few on a throwaway copy first.
        probe_model, probe_loss, _ = build(case["kind"], cfg, store)
        probe = train_loop(cfg, store, probe_model, probe_loss, model_cfg, case["probe_steps"], 1)
        times = sorted(probe["step_times"][1:])  # the first step warms up
        calibration = times[len(times) // 2]
        steps = max(1, round(case["budget_s"] / calibration))
        warmup = max(1, round(recipe["warmup"] * steps / recipe["steps"]))
    result = train_loop(cfg, store, model, loss_fn, model_cfg, steps, warmup)
    quality = score(case["kind"], model, recipe, store)
    params = sum(p.numel() for p in model.parameters())
    return {
        **result,
        "warmup": warmup,
        "calibrated_step_s": calibration,
        "params": params,
        "test_bits": quality["bits_per_token"],
        "unigram_bits": quality.get("unigram_bits_per_token"),
        "test_tokens": quality["num_tokens"],
        "threads": threads,
        "torch": torch.__version__,
    }


def quick_store(folder: str) -> str:
    """A small copy-task store for the smoke test."""
    from perceiver_ar.copy_task import write_copy_store

    return str(write_copy_store(f"{folder}/copy", length=40, num_train=64, num_validation=8))


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in RECIPES:
        p.add_argument(
            f"--{name}", default=None, metavar="STORE", help=f"the {name} store (skipped if not given)"
        )
    p.add_argument(
        "--quick", action="store_true", help="a tiny copy-task store, a few steps, in this process"
    )
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--probe-steps", type=int, default=4, help="steps timed to size the decoder's run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600.0)
    return p


def check_stores(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    """The stores to run, {name: (path, recipe)}; a wrong argument is one line and exit code 2."""
    from perceiver_ar.store import TokenStore, is_store
    from perceiver_ar.train_config import build_model_config, check_model_fits_data

    if args.batch < 1 or args.probe_steps < 2:
        parser.error("--batch must be at least 1 and --probe-steps at least 2 (the first step warms up)")
    todo = {name: (getattr(args, name), RECIPES[name]) for name in RECIPES if getattr(args, name)}
    if not todo:
        parser.error("give at least one store: --fmnist, --bach or --asterisk")
    for name, (data, recipe) in todo.items():
        if not is_store(data):
            parser.error(f"--{name} {data}: not a data store; write one with `perceiver-ar prepare`")
        store = TokenStore(data)
        modality = store.meta.get("modality", "text")
        if modality != recipe["modality"]:
            parser.error(
                f"--{name} {data}: the store holds {modality}, the recipe needs {recipe['modality']}"
            )
        try:
            cfg = train_config(recipe, data, args.batch)
            check_model_fits_data(build_model_config(cfg, store), cfg.sampler, store)
        except ValueError as e:
            parser.error(f"--{name} {data}: {e}")
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_equal_time_") as tmp:
        if args.quick:
            args.batch, args.probe_steps = 4, 3
            todo = {"copy": (quick_store(tmp), QUICK_RECIPE)}
        else:
            todo = check_stores(parser, args)
        return measure(args, todo)


def measure(args: argparse.Namespace, todo: dict[str, tuple[str, dict]]) -> int:
    """Train and score both models on each store; print, save and plot the results."""
    watch = LoadWatch("bench_equal_time")
    rows, runs = [], {}
    inline = run_one if args.quick else None
    for name, (data, recipe) in todo.items():
        base = {
            "data": data,
            "recipe": recipe,
            "batch": args.batch,
            "threads": args.threads,
            "probe_steps": args.probe_steps,
        }
        par = run_case(__file__, {**base, "kind": "par"}, timeout=args.timeout, inline=inline)
        if "error" in par:
            raise SystemExit(f"{name}: the Perceiver AR run failed: {par['error']}")
        plain = run_case(
            __file__,
            {**base, "kind": "plain", "budget_s": par["train_s"]},
            timeout=args.timeout,
            inline=inline,
        )
        if "error" in plain:
            raise SystemExit(f"{name}: the plain decoder run failed: {plain['error']}")
        runs[name] = {"par": par, "plain": plain}
        for kind, r in (("Perceiver AR", par), ("plain decoder", plain)):
            rows.append(
                {
                    "data": recipe["label"],
                    "model": kind,
                    "N": recipe["context_len"],
                    "M": recipe["num_latents"] if kind == "Perceiver AR" else recipe["context_len"],
                    "steps": r["steps"],
                    "train_s": r["train_s"],
                    "step_s": sorted(r["step_times"])[len(r["step_times"]) // 2],
                    "test_bits": r["test_bits"],
                    "unigram_bits": r["unigram_bits"],
                }
            )
        print(
            f"{name}: Perceiver AR {par['test_bits']:.3f} bits"
            f" ({par['steps']} steps, {par['train_s']:.0f} s); plain decoder {plain['test_bits']:.3f}"
            f" ({plain['steps']} steps, {plain['train_s']:.0f} s)",
            flush=True,
        )
    load = watch.finish()
    info = machine_info(args.threads)
    cols = [
        ("data", "data", ""),
        ("model", "model", ""),
        ("N", "N", ""),
        ("M", "M", ""),
        ("steps", "steps", ""),
        ("train_s", "training s", ".0f"),
        ("step_s", "s/step", ".3f"),
        ("test_bits", "test bits/token", ".3f"),
        ("unigram_bits", "unigram", ".3f"),
    ]
    title = (
        f"E=D={WIDTH}, {HEADS} heads, L={LAYERS} (decoder: {LAYERS + 1} blocks), batch {args.batch},"
        f" lr {LR}; "
        f"{info['threads']} threads, {info['cpu']}; load average {load['load_average_start']} -> "
        f"{load['load_average_end']}"
    )
    results_name = "bench_equal_time_quick" if args.quick else "bench_equal_time"
    report_table(results_name, title, rows, cols, {"machine": info, **load, "args": vars(args), "runs": runs})
    plot(runs, {name: recipe["label"] for name, (_, recipe) in todo.items()}, name=results_name)
    return 0


def plot(runs: dict, labels: dict[str, str], name: str) -> None:
    """Training loss against training seconds, one panel a data set; the test bits in the legend."""
    fig, axes = new_figure(ncols=len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False)
    for ax, (data, pair) in zip(axes[0], runs.items(), strict=True):
        for kind, color in (("par", "tab:blue"), ("plain", "tab:orange")):
            r = pair[kind]
            seconds, smooth, window = [], [], max(1, r["steps"] // 25)
            total = 0.0
            for i, t in enumerate(r["step_times"]):
                total += t
                seconds.append(total)
                chunk = r["losses"][max(0, i - window + 1) : i + 1]
                smooth.append(sum(chunk) / len(chunk) / 0.6931471805599453)  # bits
            label = "Perceiver AR" if kind == "par" else "plain decoder"
            ax.plot(
                seconds, smooth, color=color, label=f"{label}: {r['steps']} steps, test {r['test_bits']:.2f}"
            )
        ax.set_title(labels[data], fontsize=9)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("training loss, bits/token (own targets)")
        ax.legend(fontsize=8)
    save_figure(fig, name)


if __name__ == "__main__":
    script_main(run_one, main)
