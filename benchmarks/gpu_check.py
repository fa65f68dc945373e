"""The GPU check: correctness and speed of the CUDA path in one command, as JSON and a markdown table.

    python benchmarks/gpu_check.py                       # one CUDA GPU: 230 s on an H200
    python benchmarks/gpu_check.py --device cpu --quick  # the same checks at toy sizes (the tests run it)

Checks (each passes or fails) and measurements, in the order they run (the
cheap ones first, the compiled ones, minutes of code generation, last):

1. golden: the official reference logits (tests/golden/) recomputed on the
   device in fp32 with TF32 off; every logit within 1e-4.
2. kernels: the cross-attend kernel the device runs (FlexAttention on CUDA)
   against masked SDPA, for full rows, padded rows and cross-attend dropout,
   in fp32 and bf16; outputs and, on CUDA, gradients.
3. bf16 logits: golden models under bf16 autocast and cast to bf16, against
   fp32: max and mean |difference|, within the test suite's bound
   (16 x 2^-8 x the largest |logit|, tests/test_precision.py).
4. the device's matmul peak in the run's dtype and its copy bandwidth.
5. throughput: training tokens/s and model FLOPs utilisation (MFU: the
   analytic FLOPs of bench_flops.py over that peak) of Perceiver AR at
   N = 4096 / M = 512 and N = 16,384 / M = 1024 (D = E = 512, L = 6) and of
   the equal-depth decoder-only model (M = N: every attention the causal
   flash kernel, ``is_causal``), eager.
6. memory: peak GPU memory of one training step at N = 131,072 / M = 1024.
7. decode: cached greedy decode at N = 4096 / M = 512 (preset small,
   batch 1), the model cast to the run's dtype, eager: tokens/s, the bytes a
   step must read and that as a fraction of the copy bandwidth.
8. training: ``train`` on the Shakespeare store in fp32, bf16 and fp16 with
   one seed; the low-precision loss falls like fp32's (final loss within 3%).
9. compiled: sections 5 and 7 again with both models compiled as
   ``train --compile`` compiles and the decode step compiled
   (``generate(..., compile=True)``).

Writes ``results/gpu_check.json`` (every number) and beside it the same name
in markdown (the tables) after every section and training case, so a run cut
short keeps what it measured; ``gpu_check_quick.*`` with ``--quick``, and the
sections' names appended with ``--sections``. A section that raises is
recorded and the others run. Exit code 1 if a check failed or a section
raised, 3 if all passed but ``--budget-s`` skipped some, else 0.
``--quick`` shrinks every size (and the training runs to 30 steps); on a
CPU the dtype of sections 4-9 is fp32 (``--precision``), bf16 there being
emulated. ``--compile-backend aot_eager`` checks the compiled path without
Inductor's code generation (the test suite uses it: Inductor takes a minute
a graph on a small CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import BENCH_DIR, machine_info, markdown_table, median, peak_rss_mb, save_results

ROOT = BENCH_DIR.parent
GOLDEN_DIR = ROOT / "tests" / "golden"
GOLDEN_MODELS = ["A_rotary", "B_absolute_random", "C_rotary_E48_D32", "D_absolute_sinusoidal"]
GOLDEN_CASES = ["full", "padded", "short", "edge"]
NON_MODEL_KEYS = ("param_seed", "z_loss", "label_smoothing")

# Sizes: the on a GPU, toys with --quick.
FULL = dict(
    width=512,
    heads=8,
    layers=6,
    throughput=[dict(N=4096, M=512, batch=8), dict(N=16384, M=1024, batch=2)],
    memory=dict(N=131072, M=1024, batch=1),
    decode=dict(preset="small", prompt=3840, new=256),
    train=dict(preset="demo", steps=300, batch=16, lr=3e-3, warmup=40, model={}),
    kernel=dict(B=2, H=8, M=256, N=1024, dh=64),
    steps=dict(warmup=3, timed=10),
)
QUICK = dict(
    width=32,
    heads=2,
    layers=2,
    throughput=[dict(N=64, M=16, batch=2), dict(N=128, M=32, batch=1)],
    memory=dict(N=512, M=32, batch=1),
    decode=dict(preset="tiny", prompt=40, new=16),
    train=dict(
        preset="tiny", steps=30, batch=4, lr=3e-3, warmup=5, model=dict(context_len=32, num_latents=8)
    ),
    kernel=dict(B=2, H=2, M=20, N=70, dh=16),
    steps=dict(warmup=1, timed=2),
)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32_off():
    """Full fp32 matmuls and convolutions (CUDA otherwise may use TF32's 10-bit mantissa)."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def load_golden(name: str, device):
    import numpy as np

    from perceiver_ar import from_official

    data = np.load(GOLDEN_DIR / f"golden_{name}.npz", allow_pickle=False)
    kwargs = {k: v for k, v in json.loads(str(data["config_json"])).items() if k not in NON_MODEL_KEYS}
    params = {k.removeprefix("params/"): data[k] for k in data.files if k.startswith("params/")}
    return from_official(params, kwargs).eval().to(device), data


def golden_batch(data, case: str, device):
    import torch

    inputs = torch.from_numpy(data[f"{case}/inputs"]).long().to(device)
    positions = torch.from_numpy(data[f"{case}/input_idxs"][..., 0]).long().to(device)
    return inputs, positions


def first_line(e: BaseException) -> str:
    """An exception as one line that a markdown table cell can hold."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:200].replace("|", "\\|")


def check(name: str, value: float, limit: float | None, ok: bool | None, **extra: Any) -> dict[str, Any]:
    return {"check": name, "value": value, "limit": limit, "pass": ok, **extra}


# ----------------------------------------------------------------------------
# 1-3: correctness
# ----------------------------------------------------------------------------


def section_golden(device) -> list[dict]:
    import torch

    worst = 0.0
    with tf32_off(), torch.no_grad():
        for name in GOLDEN_MODELS:
            model, data = load_golden(name, device)
            for case in GOLDEN_CASES:
                out = model(*golden_batch(data, case, device))
                diff = (out.logits.double().cpu() - torch.from_numpy(data[f"{case}/logits"]).double()).abs()
                worst = max(worst, float(diff.max()))
    return [check("golden logits, fp32, TF32 off: max |diff|", worst, 1e-4, worst <= 1e-4)]


@contextlib.contextmanager
def flex_on_cpu():
    """On a CPU, take the kernel choice CUDA takes: FlexAttention, eager (forward only), in blocks of 16.

    The CPU runs flex only eagerly and without a backward, so this checks
    the block tables and the model's CUDA path for values, not for speed.
    """
    from perceiver_ar import attention

    def eager(q, k, v, block_mask):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": here that is the point
            return attention.flex_attention(q, k, v, block_mask=block_mask)

    saved = attention.use_flex, attention.flex_kernel, attention.FLEX_BLOCK
    attention.use_flex, attention.flex_kernel, attention.FLEX_BLOCK = (lambda q: True), (lambda: eager), 16
    try:
        yield
    finally:
        attention.use_flex, attention.flex_kernel, attention.FLEX_BLOCK = saved


def section_kernels(device, sizes: dict) -> list[dict]:
    """The device's cross-attend kernel against masked SDPA (the reference), fp32 and bf16; then a model."""
    import torch
    import torch.nn.functional as F

    from perceiver_ar import PerceiverAR, PerceiverARConfig, attention
    from perceiver_ar.attention import CrossMask

    B, H, M, N, dh = (sizes[k] for k in ("B", "H", "M", "N", "dh"))
    g = torch.Generator().manual_seed(0)
    full = torch.arange(N - M, N)[None].expand(B, M)
    index = torch.tensor([N, N // 2 + 3])[:B, None] - M + torch.arange(M)
    padded = torch.where(index >= 0, index, N - 1)  # the second row is short: invalid latents
    keep = torch.rand(B, N, generator=g) > 0.4
    cases = {"full rows": None, "padded rows": CrossMask(padded), "dropout": CrossMask(full, keep)}
    on_cuda = device.type == "cuda"
    grads = on_cuda  # FlexAttention has no backward on a CPU
    probe = torch.empty(1, 1, 1, dh, device=device)
    kernel = "FlexAttention, compiled" if on_cuda and attention.use_flex(probe) else "SDPA with a mask"
    if not on_cuda:
        kernel = "FlexAttention, eager (forward only)"
    choice = contextlib.nullcontext if on_cuda else flex_on_cpu
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        outs, dgrads = {}, {}
        for case, mask in cases.items():
            q, k, v = (torch.randn(B, H, n, dh, generator=g).to(device, dtype) for n in (M, N, N))
            if mask is not None:
                mask = CrossMask(mask.last.to(device), None if mask.keep is None else mask.keep.to(device))
            dense = attention.band_mask(M, N, device) if mask is None else mask.dense(N)
            leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
            ref_leaves = [t.detach().float().requires_grad_(grads) for t in (q, k, v)]
            with tf32_off(), torch.set_grad_enabled(grads), choice():
                out = attention.scaled_dot_product(*leaves, mask=mask, causal=mask is None)
                ref = F.scaled_dot_product_attention(*ref_leaves, attn_mask=dense)
            outs[case] = float((out.detach().float() - ref.detach()).abs().max())
            if grads:
                grad = torch.randn(out.shape, generator=g).to(device)
                out.backward(grad.to(dtype))
                ref.backward(grad)
                dgrads[case] = max(
                    float((a.grad.float() - b.grad).abs().max())
                    for a, b in zip(leaves, ref_leaves, strict=True)
                )
        name = "fp32" if dtype == torch.float32 else "bf16"
        worst = max(outs.values())
        rows.append(
            check(
                f"cross-attend kernel vs SDPA, {name}: max |diff|",
                worst,
                tol,
                worst <= tol,
                kernel=kernel,
                per_case=outs,
            )
        )
        if grads:
            worst = max(dgrads.values())
            rows.append(
                check(
                    f"cross-attend gradients vs SDPA, {name}: max |diff|",
                    worst,
                    10 * tol,
                    worst <= 10 * tol,
                    kernel=kernel,
                    per_case=dgrads,
                )
            )
    # The model on the device's kernels against the model on the CPU's (PrefixCausalAttention and
    # masked SDPA), in fp32: full rows and padded rows, heads wide enough for the flex kernels.
    torch.manual_seed(0)
    cfg = PerceiverARConfig(
        context_len=N,
        num_latents=M,
        input_dim=H * dh,
        latent_dim=H * dh,
        num_latent_layers=2,
        cross_attend_heads=H,
        latent_heads=H,
        final_layer_init_zeros=False,
    )
    model = PerceiverAR(cfg).eval()
    x = torch.randint(3, cfg.vocab_size, (B, N), generator=g)
    x[1, N // 2 + 3 :] = 0
    worst = 0.0
    with torch.no_grad(), tf32_off():
        for batch in (x[:1], x):
            ref = model(batch).logits
            with choice():
                out = model.to(device)(batch.to(device)).logits.cpu()
            model.cpu()
            worst = max(worst, float((out - ref).abs().max()))
    rows.append(
        check(
            "model logits on the device's kernels vs the CPU's, fp32: max |diff|",
            worst,
            1e-4,
            worst <= 1e-4,
            kernel=kernel,
        )
    )
    return rows


def section_bf16_logits(device) -> list[dict]:
    import copy

    import torch

    rows = []
    for mode in ("autocast", "cast"):
        worst_ratio, worst, means = 0.0, 0.0, []
        for name in GOLDEN_MODELS:
            model, data = load_golden(name, device)
            low = copy.deepcopy(model).to(torch.bfloat16) if mode == "cast" else model
            for case in ("full", "padded"):
                batch = golden_batch(data, case, device)
                with torch.no_grad(), tf32_off():
                    ref = model(*batch).logits.float()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
                        out = low(*batch).logits.float()
                diff = (out - ref).abs()
                scale = float(ref.abs().max())
                worst = max(worst, float(diff.max()))
                worst_ratio = max(worst_ratio, float(diff.max()) / (2.0**-8 * scale))
                means.append(float(diff.mean()))
        rows.append(
            check(
                f"bf16 {mode} logits vs fp32: max |diff|",
                worst,
                None,
                worst_ratio <= 16,
                mean_abs_diff=sum(means) / len(means),
                max_in_units_of_u_scale=worst_ratio,
                limit_text="16 u max|logit| (u = 2^-8)",
            )
        )
    return rows


# ----------------------------------------------------------------------------
# 4: training runs
# ----------------------------------------------------------------------------


def shakespeare_store(data: str | None, work: Path) -> tuple[str, str]:
    from perceiver_ar.data import prepare_text

    if data:
        return data, data
    return str(prepare_text(None, work / "shakespeare")), "Shakespeare (38 plays, bytes)"


def section_training(device, sizes: dict, data: str | None, work: Path) -> list[dict]:
    from perceiver_ar.train import TrainConfig, train

    store, store_name = shakespeare_store(data, work)
    t = sizes["train"]
    finals, curves = {}, {}
    for precision in ("fp32", "bf16", "fp16"):
        run = work / f"run_{precision}"
        cfg = TrainConfig(
            data=store,
            out=str(run),
            preset=t["preset"],
            model=dict(t["model"]),
            steps=t["steps"],
            batch_size=t["batch"],
            lr=t["lr"],
            warmup_steps=t["warmup"],
            eval_every=0,
            eval_tokens=4096,
            checkpoint_every=t["steps"],
            device=str(device),
            precision=precision,
            progress=False,
            tensorboard=False,
            threads=0,  # the trainer's default: the cores (its CPU work on a GPU)
        )
        with contextlib.redirect_stdout(sys.stderr):
            train(cfg)
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        curve = [r["loss"] for r in lines if "loss" in r]
        tail = max(1, len(curve) // 10)
        curves[precision] = curve
        finals[precision] = sum(curve[-tail:]) / tail
    rows = []
    start = sum(curves["fp32"][:5]) / 5
    for precision in ("bf16", "fp16"):
        rel = abs(finals[precision] - finals["fp32"]) / finals["fp32"]
        falls = finals[precision] < start - 0.5
        rows.append(
            check(
                f"{precision} training: final loss vs fp32 (relative)",
                rel,
                0.03,
                rel <= 0.03 and falls,
                store=store_name,
                steps=t["steps"],
                final_loss=finals[precision],
                fp32_final_loss=finals["fp32"],
                first_loss=start,
            )
        )
    return rows


# ----------------------------------------------------------------------------
# 5-7: speed and memory
# ----------------------------------------------------------------------------


def model_config(sizes: dict, N: int, M: int):
    from perceiver_ar import PerceiverARConfig

    return PerceiverARConfig(
        context_len=N,
        num_latents=M,
        input_dim=sizes["width"],
        latent_dim=sizes["width"],
        num_latent_layers=sizes["layers"],
        cross_attend_heads=sizes["heads"],
        latent_heads=sizes["heads"],
    )


def device_seconds(device, fn, repeats: int = 5) -> float:
    """Median seconds of ``fn`` on ``device`` over ``repeats`` synchronized calls after one warm-up."""
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return median(times)


def matmul_peak(device, dtype, quick: bool) -> float:
    """Median FLOP/s of a square matmul in ``dtype``: the denominator of MFU."""
    import torch

    n = 1024 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / device_seconds(device, lambda: a @ b)


def compiled(model, backend: str):
    """The forward as ``train --compile`` compiles it (another backend only for quick checks)."""
    import torch

    from perceiver_ar.train import compile_forward

    return (
        compile_forward(model)
        if backend == "inductor"
        else torch.compile(model, dynamic=False, backend=backend)
    )


def time_training(rt, cfg, batch: int, compile_backend: str | None, steps: dict) -> dict[str, Any]:
    """Median seconds of a training step (forward, loss, backward, AdamW) on random full rows."""
    import torch
    from bench_flops import training_flops

    from perceiver_ar import PerceiverAR
    from perceiver_ar.loss import perceiver_ar_loss

    torch.manual_seed(0)
    model = PerceiverAR(cfg).to(rt.device).train()
    forward = compiled(model, compile_backend) if compile_backend else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    events = torch.randint(3, cfg.vocab_size, (batch, cfg.context_len + 1), device=rt.device)
    inputs, targets = events[:, :-1], events[:, 1:]

    def step() -> None:
        with rt.autocast():
            out = forward(inputs, full_rows=True, validate=False)
            loss = perceiver_ar_loss(out.logits, targets, out.latent_index).mean
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(steps["warmup"]):  # the compile happens here
        step()
    sync(rt.device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps["timed"]):
        t0 = time.perf_counter()
        step()
        sync(rt.device)
        times.append(time.perf_counter() - t0)
    flops_cfg = dict(
        input_dim=cfg.input_dim,
        latent_dim=cfg.latent_dim,
        num_latent_layers=cfg.num_latent_layers,
        vocab_size=cfg.vocab_size,
        cross_attend_widening=cfg.cross_attend_widening,
        latent_widening=cfg.latent_widening,
    )
    seconds = median(times)
    return {
        "step_s": seconds,
        "warmup_s": warmup_s,
        "tokens_per_s": batch * cfg.context_len / seconds,
        "flops_per_step": training_flops(flops_cfg, cfg.context_len, cfg.num_latents, batch),
    }


def throughput_cases(
    sizes: dict, backend: str, compiled_pass: bool
) -> list[tuple[str, int, int, int, str | None]]:
    """(model, N, M, batch, compile backend or None) of one pass: eager cases, or the compiled ones."""
    cases = []
    for size in sizes["throughput"]:
        N, M, batch = size["N"], size["M"], size["batch"]
        if compiled_pass:  # both compiled: the decoder's strongest form is a baseline too
            cases += [("perceiver_ar", N, M, batch, backend), ("decoder", N, N, batch, backend)]
        else:
            cases += [("perceiver_ar", N, M, batch, None), ("decoder", N, N, batch, None)]
    return cases


def section_throughput(
    rt, sizes: dict, backend: str, peak: float | None, compiled_pass: bool, deadline: float
) -> Iterator[dict]:
    """Training speed of each case of the pass, a row at a time (each saved as it comes).

    A case that would start after ``deadline`` is skipped; one that raises keeps
    its error in its row and the next case runs.
    """
    import torch

    for model_name, N, m, batch, option in throughput_cases(sizes, backend, compiled_pass):
        row = {"model": model_name, "N": N, "M": m, "batch": batch, "compile": option or "no"}
        if time.perf_counter() > deadline:
            yield {**row, "error": "skipped: time budget spent"}
            continue
        try:
            r = time_training(rt, model_config(sizes, N, m), batch, option, sizes["steps"])
            r["mfu"] = r["flops_per_step"] / r["step_s"] / peak if peak else None
        except torch.OutOfMemoryError:
            r = {"error": "out of memory"}
        except Exception as e:  # noqa: BLE001 - one case's failure must not lose the others
            traceback.print_exc()
            r = {"error": first_line(e)}
        yield {**row, **r}
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()


def section_memory(rt, sizes: dict) -> dict[str, Any]:
    import torch

    size = sizes["memory"]
    cfg = model_config(sizes, size["N"], size["M"])
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    try:
        time_training(rt, cfg, size["batch"], None, dict(warmup=1, timed=1))
    except torch.OutOfMemoryError:
        return {"N": size["N"], "M": size["M"], "error": "out of memory"}
    if rt.device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(rt.device) / 2**30, "peak GPU memory allocated"
    else:
        peak, what = peak_rss_mb() / 1024, "peak resident memory of this process (every section so far)"
    return {"N": size["N"], "M": size["M"], "batch": size["batch"], "peak_gb": peak, "measure": what}


def copy_bandwidth(device, quick: bool) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written (median of 5)."""
    import torch

    n = 2**22 if quick else 2**29  # fp32 elements: 16 MiB, or 2 GiB on a GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / device_seconds(device, lambda: dst.copy_(src))


def section_decode(rt, sizes: dict, option: str | None, bandwidth: float | None) -> list[dict]:
    """Cached greedy decode at batch 1, eager (``option`` None) or with the step compiled by ``option``.

    The median of 3 timed generations after a warm-up one.
    Next to tokens/s: the bytes a step must read (``bench_ports.decode_bytes_per_token``:
    every weight once, the cross-attend cache and the latent caches once), the GB/s that
    makes, and that as a fraction of the device's copy bandwidth measured in this run.
    """
    import torch
    from bench_ports import decode_bytes_per_token

    from perceiver_ar import PerceiverAR, PerceiverARConfig
    from perceiver_ar.generate import generate

    d = sizes["decode"]
    torch.manual_seed(0)
    cfg = PerceiverARConfig.from_preset(d["preset"], final_layer_init_zeros=False)
    model = rt.for_inference(PerceiverAR(cfg))
    prompt = torch.randint(3, cfg.vocab_size, (1, d["prompt"]), device=rt.device)
    # generate(compile=...) compiles the one-token step (and the reset's) once per
    # cache size: the warm-up generates as many tokens as the timed run, so the
    # timed run reuses the compiled steps.
    kwargs = {"compile": True if option == "inductor" else option} if option else {}
    generate(model, prompt, d["new"] if option else min(d["new"], 8), temperature=0, **kwargs)
    runs = [generate(model, prompt, d["new"], temperature=0, **kwargs) for _ in range(3)]
    per_token = decode_bytes_per_token(model, d["prompt"], d["new"])["bytes_per_token"]
    tok_s = median([out.decode_tokens_per_second for out in runs])
    fraction = per_token * tok_s / bandwidth if bandwidth else None
    return [
        {
            "N": cfg.context_len,
            "M": cfg.num_latents,
            "prompt": d["prompt"],
            "new_tokens": d["new"],
            "compile": option or "no",
            "dtype": str(rt.dtype).removeprefix("torch."),
            "decode_tokens_per_s": tok_s,
            "ms_per_token": 1e3 / tok_s,
            "prefill_s": median([out.prefill_seconds for out in runs]),
            "runs_tokens_per_s": [out.decode_tokens_per_second for out in runs],
            "mb_per_token": per_token / 1e6,
            "achieved_gb_s": per_token * tok_s / 1e9,
            "fraction_of_bandwidth": fraction,
        }
    ]


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


def write_markdown(result: dict[str, Any], path: Path) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "pass" if v else "FAIL"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    m = result["machine"]
    lines = [
        f"# GPU check: {m['device_name']} ({result['mode']})",
        "",
        f"{m['time_utc']}, torch {m['torch']}, {m['device_name']}; precision of the speed sections: "
        f"{result['precision']}; {result['total_seconds']:.0f} s in all.",
        "",
        "| check | value | limit | result |",
        "|---|---:|---:|---|",
    ]
    for row in result["checks"]:
        limit = row.get("limit_text") or fmt(row["limit"])
        lines.append(f"| {row['check']} | {fmt(row['value'])} | {limit} | {fmt(row['pass'])} |")
    for label, error in result["errors"].items():
        lines.append(f"| section {label} raised | {error[:200]} | - | FAIL |")
    if result.get("matmul_peak_flops"):
        lines += [
            "",
            f"Matmul peak ({result['precision']}): {result['matmul_peak_flops'] / 1e12:.3g} TFLOP/s.",
        ]
    if result.get("copy_bandwidth"):
        lines += [f"Device copy bandwidth (read + write): {result['copy_bandwidth'] / 1e9:,.0f} GB/s."]
    lines += ["", "Training speed (bf16 autocast on CUDA; eager, and compiled as `train --compile`):", ""]
    columns = [
        ("model", "model", ""),
        ("N", "N", "d"),
        ("M", "M", "d"),
        ("batch", "batch", "d"),
        ("compile", "compiled (backend)", ""),
        ("tokens_per_s", "tokens/s", ",.0f"),
        ("step_s", "step (ms)", ".1f"),
        ("mfu", "MFU", ".1%"),
        ("warmup_s", "first steps (s)", ".1f"),
        ("error", "error", ""),
    ]
    rows = [{**r, "step_s": r["step_s"] * 1e3} if "step_s" in r else r for r in result["throughput"]]
    lines.append(markdown_table(rows, columns))
    mem = result["memory"]
    if mem:
        lines += [
            "",
            f"Memory of one training step at N = {mem['N']:,}, M = {mem['M']}: "
            + (f"{mem['peak_gb']:.2f} GB ({mem['measure']})." if "peak_gb" in mem else mem["error"]),
        ]
    lines += ["", "Cached greedy decode, batch 1:", ""]
    columns = [
        ("N", "N", "d"),
        ("M", "M", "d"),
        ("dtype", "dtype", ""),
        ("compile", "compile", ""),
        ("decode_tokens_per_s", "tokens/s", ",.1f"),
        ("ms_per_token", "ms/token", ".2f"),
        ("prefill_s", "prefill (s)", ".3f"),
        ("mb_per_token", "MB read/token", ".1f"),
        ("achieved_gb_s", "GB/s", ".1f"),
        ("fraction_of_bandwidth", "of copy bandwidth", ".1%"),
    ]
    lines.append(markdown_table(result["decode"], columns))
    if result["skipped"]:
        lines += ["", "Skipped (time budget spent): " + ", ".join(result["skipped"]) + "."]
    lines += ["", "Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())]
    path.write_text("\n".join(lines) + "\n")


SECTIONS = ("golden", "kernels", "bf16-logits", "throughput", "memory", "decode", "training", "compiled")


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes: every check in about a minute on a CPU")
    p.add_argument(
        "--precision", default="auto", help="of the speed sections: auto (bf16 on CUDA, fp32 on CPU)"
    )
    p.add_argument(
        "--data", default=None, help="the Shakespeare store (default: prepared into a temporary folder)"
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compiled cases"
    )
    p.add_argument("--out", default=None, help="folder for the JSON and markdown results (default: results/)")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run only these (a rerun of what failed); 'compiled' is the compiled training and decode",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip every section and case that would start after this many seconds from the start "
        "(a lease's limit); one already running ends first, so leave room for the longest (about 2 min)",
    )
    return p


def device_properties(device) -> dict[str, Any]:
    """What the GPU reports of itself (memory, multiprocessors, capability); nothing on a CPU."""
    import torch

    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {
        "total_memory_gib": props.total_memory / 2**30,
        "multiprocessors": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()  # the budget counts from here: imports and device set-up included
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    deadline = t_start + args.budget_s if args.budget_s else math.inf
    sections = [s for s in SECTIONS if s in args.sections]  # one order, each once

    import torch

    from perceiver_ar.runtime import setup_runtime

    rt = setup_runtime(args.device, args.precision, threads=None)
    sizes = QUICK if args.quick else FULL
    out_dir = Path(args.out) if args.out else None
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "CPU"
    machine = {
        **machine_info(torch.get_num_threads()),
        "device": str(rt.device),
        "device_name": name,
        **device_properties(rt.device),
    }
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "precision": rt.precision,
        "compile_backend": args.compile_backend,
        "sections": sections,
        "budget_s": args.budget_s,
        "checks": [],
        "throughput": [],
        "memory": {},
        "decode": [],
        "errors": {},
        "skipped": [],
        "seconds": {},
    }
    result_name = "gpu_check_quick" if args.quick else "gpu_check"
    if sections != list(SECTIONS):
        result_name += "_" + "_".join(s.replace("-", "") for s in sections)

    def save() -> Path:
        """Written after every section and case: a run stopped at a lease's limit keeps its numbers."""
        result["total_seconds"] = time.perf_counter() - t_start
        result["all_checks_pass"] = all(c["pass"] for c in result["checks"]) and not result["errors"]
        skipped_cases = any(str(r.get("error", "")).startswith("skipped") for r in result["throughput"])
        result["complete"] = not result["skipped"] and not skipped_cases
        path = save_results(result_name, result, out_dir)
        write_markdown(result, path.with_suffix(".md"))
        return path

    def section(label: str, key: str, fn, *a) -> None:
        """Run one section into ``result[key]``; an exception is recorded (and printed), not fatal.

        A section that yields its rows (a generator) has each one saved as it comes.
        """
        if time.perf_counter() > deadline:
            result["skipped"].append(label)
            return
        print(f"[gpu_check] {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            value = fn(*a)
            if isinstance(value, Iterator):
                for row in value:
                    result[key].append(row)
                    save()
            elif isinstance(result.get(key), list):
                result[key] += value
            else:
                result[key] = value
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            traceback.print_exc()
            result["errors"][label] = first_line(e)
        result["seconds"][label] = time.perf_counter() - t0
        save()

    want = set(sections)
    quick, backend = args.quick, args.compile_backend
    with tempfile.TemporaryDirectory() as tmp:
        if "golden" in want:
            section("golden", "checks", section_golden, rt.device)
        if "kernels" in want:
            section("kernels", "checks", section_kernels, rt.device, sizes["kernel"])
        if "bf16-logits" in want:
            section("bf16 logits", "checks", section_bf16_logits, rt.device)
        if want & {"throughput", "compiled", "decode"}:
            section("matmul peak", "matmul_peak_flops", matmul_peak, rt.device, rt.dtype, quick)
            section("copy bandwidth", "copy_bandwidth", copy_bandwidth, rt.device, quick)
        peak, bandwidth = result.get("matmul_peak_flops"), result.get("copy_bandwidth")
        # The cheap measurements first, the compiled ones (minutes of code generation) last.
        if "throughput" in want:
            section("throughput", "throughput", section_throughput, rt, sizes, backend, peak, False, deadline)
        if "memory" in want:
            section("memory", "memory", section_memory, rt, sizes)
        if "decode" in want:
            section("decode", "decode", section_decode, rt, sizes, None, bandwidth)
        if "training" in want:
            section("training", "checks", section_training, rt.device, sizes, args.data, Path(tmp))
        if "compiled" in want:
            compiled_args = (rt, sizes, backend, peak, True, deadline)
            section("compiled training", "throughput", section_throughput, *compiled_args)
            section("compiled decode", "decode", section_decode, rt, sizes, backend, bandwidth)
    path = save()
    print(path.with_suffix(".md").read_text())
    return result


def exit_code(result: dict[str, Any]) -> int:
    """1: a check failed or a section raised; 3: all passed but the budget skipped some; else 0."""
    if not result["all_checks_pass"]:
        return 1
    return 0 if result["complete"] else 3


if __name__ == "__main__":
    sys.exit(exit_code(main()))
