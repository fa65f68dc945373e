"""What the latents read: the cross-attend weights of one sequence, aggregated so that long N fits.

``cross_attention_map(model, inputs)`` runs the model's ordinary cache-free
forward on one row and captures, with hooks, the cross-attend's inputs and
the output of its attention kernel. The weights are then recomputed from the
q and k of ``CrossAttend.project`` (the code the forward itself runs) with
``attention.attention_weights`` under the forward's own masks, a few latents
at a time, and checked against the kernel: weights @ v must reproduce the
kernel's output, so the picture cannot drift from the model. Only sums are
kept: the weights per head summed over blocks of input positions (and
averaged over blocks of latents), and each latent's mass by distance from
its own input in power-of-two buckets, so memory is O(H x M x N / block)
however long the input.

``write_attention_maps`` draws them (a heat map per head and their mean, a
plot of mass against distance) and saves the arrays; ``inspect_store`` does
it for a sequence of a data store (``perceiver-ar inspect``).
"""

from __future__ import annotations

import inspect
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .attention import attention_weights, cross_visible
from .files import check_output_path, is_empty_dir, publish_dir, read_json, remove_temp, temp_dir_beside
from .files import write_json as write_json_file
from .model import PerceiverAR
from .provenance import check_store
from .samplers import positions_for_crop
from .store import TokenStore

# Score entries [H, latents, N] computed at once; bounds the memory of a long N.
CHUNK_ENTRIES = 1 << 23
MAX_COLUMNS = 1024  # position blocks of the default heat map
MAX_ROWS = 512  # latent blocks of the default heat map
MARKER = "inspect.json"
FORMAT = "perceiver-ar-inspect-1"


@dataclass
class CrossAttentionMap:
    """The cross-attend weights of one sequence, summed over blocks (shapes for B = 1).

    ``weights[h, r, c]``: the weight head h of a latent in latent block r gives
    to the inputs of position block c (summed over the block's inputs,
    averaged over the block's latents); each row sums to 1 over the columns.
    ``distance_mass[h, m, d]``: the weight latent m gives to inputs d-bucket
    back from its own input (bucket 0: itself, bucket b >= 1: 2^(b-1) to
    2^b - 1 back), and ``distance_count[m, d]`` how many inputs that bucket
    holds for latent m (fewer than the bucket's width near the sequence
    start). ``visible_sum`` / ``hidden_sum`` [H, M]: each latent's total
    weight on the inputs it may see / may not see (1 and exactly 0).
    """

    weights: np.ndarray  # [H, rows, columns]
    distance_mass: np.ndarray  # [H, M, buckets]
    distance_count: np.ndarray  # [M, buckets]
    latent_index: np.ndarray  # [M] input index of each latent
    visible_sum: np.ndarray  # [H, M]
    hidden_sum: np.ndarray  # [H, M]
    num_inputs: int
    position_block: int
    latent_block: int
    kernel_error: float  # max |weights @ v - the kernel's output|
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_weights(self) -> np.ndarray:
        """The heads' mean, [rows, columns]."""
        return self.weights.mean(axis=0)

    def distance_density(self) -> np.ndarray:
        """Weight per input at each distance bucket, [H, buckets]: mass / inputs, averaged over latents.

        Uniform attention is flat here, while ``distance_mass`` grows with
        the bucket width; latents without inputs in a bucket do not count.
        """
        count = self.distance_count[None]
        per_input = np.where(count > 0, self.distance_mass / np.maximum(count, 1), 0.0)
        latents = np.maximum((self.distance_count > 0).sum(axis=0), 1)
        return per_input.sum(axis=1) / latents

    def distance_buckets(self) -> list[str]:
        """Labels of the distance buckets: "0", "1", "2-3", "4-7", ..."""
        labels = ["0"]
        for b in range(1, self.distance_mass.shape[-1]):
            lo, hi = 2 ** (b - 1), 2**b - 1
            labels.append(str(lo) if lo == hi else f"{lo}-{hi}")
        return labels

    def summary(self) -> dict[str, Any]:
        """inspect.json's numbers: the checks, the mean mass per distance bucket (per head and overall)."""
        per_head = self.distance_mass.mean(axis=1)  # [H, buckets]
        return {
            "num_inputs": self.num_inputs,
            "num_latents": int(len(self.latent_index)),
            "heads": int(self.weights.shape[0]),
            "position_block": self.position_block,
            "latent_block": self.latent_block,
            "max_abs_visible_sum_minus_1": float(np.abs(self.visible_sum - 1.0).max()),
            "max_hidden_sum": float(self.hidden_sum.max()),
            "kernel_error": self.kernel_error,
            "distance_buckets": self.distance_buckets(),
            "distance_mass_mean": per_head.mean(axis=0).round(6).tolist(),
            "distance_mass_per_head": per_head.round(6).tolist(),
            "weight_per_input_mean": self.distance_density().mean(axis=0).tolist(),
            **self.extra,
        }


def auto_block(size: int, limit: int) -> int:
    """The smallest block that leaves at most ``limit`` blocks of ``size`` items."""
    return max(1, math.ceil(size / limit))


def capture_cross_attend(model: PerceiverAR, inputs: Tensor, positions: Tensor | None) -> dict[str, Any]:
    """Run the cache-free forward once; return the cross-attend's arguments and its kernel output.

    Two hooks: one before ``model.cross_attend`` (its z0, embeddings, masks
    and rotary tables) and one before the attention's output projection
    (the kernel's output, heads concatenated). Nothing about the forward changes.
    """
    module = model.cross_attend
    seen: dict[str, Any] = {}
    signature = inspect.signature(module.forward)

    def before_cross(_module, args, kwargs):
        seen["args"] = signature.bind(*args, **kwargs).arguments

    def before_output(_module, args):
        seen["kernel_out"] = args[0].detach()

    hooks = [
        module.register_forward_pre_hook(before_cross, with_kwargs=True),
        module.attention.wo.register_forward_pre_hook(before_output),
    ]
    try:
        with torch.no_grad():
            seen["output"] = model(inputs, positions)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def cross_attention_map(
    model: PerceiverAR,
    inputs: Tensor,
    positions: Tensor | None = None,
    position_block: int | None = None,
    latent_block: int | None = None,
    tolerance: float = 1e-3,
) -> CrossAttentionMap:
    """The cross-attend weights of one sequence ``inputs`` [1, T] (positions as the forward takes them).

    position_block / latent_block: inputs per heat-map column and latents per
    row (default: at most ``MAX_COLUMNS`` columns and ``MAX_ROWS`` rows).
    tolerance: largest allowed difference between weights @ v and the
    kernel's output, relative to the output's scale (RuntimeError beyond it:
    the weights would not be the model's).
    """
    if not torch.is_tensor(inputs) or inputs.dim() != 2 or inputs.shape[0] != 1:
        shape = tuple(inputs.shape) if torch.is_tensor(inputs) else type(inputs).__name__
        raise ValueError(f"inputs must be one sequence [1, T] of token ids, got {shape}")
    was_training = model.training
    model.eval()
    try:
        seen = capture_cross_attend(model, inputs, positions)
    finally:
        model.train(was_training)
    args = seen["args"]
    module = model.cross_attend
    q, k, v = module.project(args["z0"], args["emb"], args["rope_q"], args["rope_k"])
    masks = args["masks"]
    _, H, M, dh = q.shape
    T = k.shape[2]
    kernel_out = module.attention.split_heads(seen["kernel_out"]).float()  # [1, H, M, dh]
    latent_index = seen["output"].latent_index[0]  # [M]
    pb = position_block or auto_block(T, MAX_COLUMNS)
    lb = latent_block or auto_block(M, MAX_ROWS)
    if pb < 1 or lb < 1:
        raise ValueError(f"position_block and latent_block must be >= 1, got {pb} and {lb}")
    columns, rows = math.ceil(T / pb), math.ceil(M / lb)
    num_buckets = max(T - 1, 1).bit_length() + 1  # distances 0 .. T-1

    device = q.device
    weights = torch.zeros(H, rows, columns, dtype=torch.float64, device=device)
    distance_mass = torch.zeros(H, M, num_buckets, dtype=torch.float64, device=device)
    distance_count = torch.zeros(M, num_buckets + 1, dtype=torch.float64, device=device)
    visible_sum = torch.zeros(H, M, dtype=torch.float64, device=device)
    hidden_sum = torch.zeros(H, M, dtype=torch.float64, device=device)
    error = 0.0
    scale = float(kernel_out.abs().max().clamp(min=1e-6))
    chunk = max(1, CHUNK_ENTRIES // (H * T))
    j = torch.arange(T, device=device)
    for start in range(0, M, chunk):
        sl = slice(start, min(start + chunk, M))
        visible = cross_visible(masks, M, T, sl, device)  # [1, 1, c, T]
        uniform = None if masks.uniform_rows is None else masks.uniform_rows[:, sl]
        w = attention_weights(q[:, :, sl], k, visible, uniform)[0]  # [H, c, T] fp32
        error = max(error, float((w @ v[0].float() - kernel_out[0, :, sl]).abs().max()))
        vis = visible[0, 0]  # [c, T]
        visible_sum[:, sl] = (w * vis).sum(-1).double()
        hidden_sum[:, sl] = (w * ~vis).sum(-1).double()
        c = w.shape[1]
        padded = torch.zeros(H, c, columns * pb, device=device)
        padded[..., :T] = w
        block_sums = padded.view(H, c, columns, pb).sum(-1).double()  # [H, c, columns]
        row_of = torch.arange(sl.start, sl.stop, device=device) // lb
        weights.index_add_(1, row_of, block_sums)
        # Distance of every input from the latent's own input; later inputs (hidden) count nowhere.
        distance = latent_index[sl].clamp(min=0)[:, None] - j  # [c, T]
        bucket = torch.where(distance > 0, torch.log2(distance.clamp(min=1).double()).floor().long() + 1, 0)
        bucket = torch.where(distance >= 0, bucket, num_buckets)  # an extra bin, dropped
        binned = torch.zeros(H, c, num_buckets + 1, dtype=torch.float64, device=device)
        binned.scatter_add_(2, bucket.expand(H, c, T), w.double())
        distance_mass[:, sl] = binned[..., :num_buckets]
        distance_count[sl].scatter_add_(
            1, bucket, torch.ones(bucket.shape, dtype=torch.float64, device=device)
        )
    if error > tolerance * scale:
        raise RuntimeError(
            f"the recomputed weights give the cross-attend output to {error:.3g} (scale {scale:.3g}): "
            "they are not the weights the kernel applied"
        )
    counts = torch.bincount(torch.arange(M, device=device) // lb, minlength=rows).double()
    weights /= counts[None, :, None]
    return CrossAttentionMap(
        weights=weights.cpu().numpy(),
        distance_mass=distance_mass.cpu().numpy(),
        distance_count=distance_count[:, :num_buckets].cpu().numpy(),
        latent_index=latent_index.cpu().numpy(),
        visible_sum=visible_sum.cpu().numpy(),
        hidden_sum=hidden_sum.cpu().numpy(),
        num_inputs=T,
        position_block=pb,
        latent_block=lb,
        kernel_error=error,
    )


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def draw_heat_maps(amap: CrossAttentionMap, path: Path, title: str = "", heads: bool = True) -> Path:
    """The mean over heads, then each head: latents (rows) against input positions (columns), log colour.

    ``heads=False`` draws the mean alone (a smaller file, for documents).

    Cells with no weight at all (inputs a latent may not see) are left blank,
    so the causal boundary shows as the edge of the coloured region.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    panels = [("mean of heads", amap.mean_weights)]
    if heads:
        panels += [(f"head {h}", amap.weights[h]) for h in range(amap.weights.shape[0])]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.8 * cols + 1, 3.2 * nrows + 0.4), squeeze=False, layout="constrained"
    )
    T, lb, pb = amap.num_inputs, amap.latent_block, amap.position_block
    first, last = int(amap.latent_index[0]), int(amap.latent_index[-1])
    positive = amap.weights[amap.weights > 0]
    vmin = max(float(positive.min()) if positive.size else 1e-6, 1e-5)
    norm = LogNorm(vmin=vmin, vmax=1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = None
    for ax, (name, grid) in zip(axes.flat, panels, strict=False):
        shown = np.ma.masked_where(grid <= 0, grid)
        image = ax.imshow(
            shown,
            aspect="auto",
            origin="upper",
            interpolation="nearest",
            cmap=cmap,
            norm=norm,
            extent=(0, T, last + 0.5, first - 0.5),
        )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"input position ({pb} per cell)" if pb > 1 else "input position", fontsize=8)
        ax.set_ylabel(f"latent's own input ({lb} per cell)" if lb > 1 else "latent's own input", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight (summed per cell)")
    if title:
        fig.suptitle(textwrap.fill(title, 40 + 30 * (cols - 1)), fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_distance(amap: CrossAttentionMap, path: Path, title: str = "") -> Path:
    """Attention against distance back from the latent's own input, per head and their mean.

    Left: the mass in each power-of-two bucket of distances (where the
    attention goes); right: the weight per input in it (what one input at
    that distance gets; flat for uniform attention).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(amap.distance_mass.shape[-1])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        (amap.distance_mass.mean(axis=1), "attention mass in the bucket (mean over latents)"),
        (amap.distance_density(), "weight per input (mean over latents)"),
    )
    for ax, (per_head, ylabel) in zip(axes, panels, strict=True):
        for h, values in enumerate(per_head):
            ax.plot(x, np.where(values > 0, values, np.nan), lw=1, alpha=0.6, marker=".", label=f"head {h}")
        mean = per_head.mean(axis=0)
        ax.plot(x, np.where(mean > 0, mean, np.nan), color="black", lw=2.5, marker="o", label="mean of heads")
        ax.set_xticks(x, amap.distance_buckets(), rotation=45, fontsize=7)
        ax.set_xlabel("distance back from the latent's input (inputs)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_attention_maps(
    amap: CrossAttentionMap, directory: Path, title: str = "", heads: bool = True
) -> dict[str, str]:
    """attention.png, distance.png, attention.npz (the arrays) and inspect.json into ``directory``.

    ``heads=False``: the heat map shows the mean of the heads only.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "heat_map": draw_heat_maps(amap, directory / "attention.png", title, heads),
        "distance": draw_distance(amap, directory / "distance.png", title),
    }
    np.savez_compressed(
        directory / "attention.npz",
        weights=amap.weights.astype(np.float32),
        distance_mass=amap.distance_mass.astype(np.float32),
        distance_count=amap.distance_count.astype(np.int64),
        latent_index=amap.latent_index,
        visible_sum=amap.visible_sum,
        hidden_sum=amap.hidden_sum,
    )
    files["arrays"] = directory / "attention.npz"
    write_json_file(directory / MARKER, {"format": FORMAT, **amap.summary()})
    files["summary"] = directory / MARKER
    return {k: str(v) for k, v in files.items()}


# ----------------------------------------------------------------------------
# A sequence of a store (perceiver-ar inspect)
# ----------------------------------------------------------------------------


def check_inspect_output(out: str | Path, inputs: list[str]) -> Path:
    """``--out``: a new or empty folder, or one inspect wrote before (its inspect.json says so)."""
    target = check_output_path(out, inputs, scanned=False)
    if target.exists() and not is_empty_dir(target):
        marker = read_json(target / MARKER)
        if not (isinstance(marker, dict) and marker.get("format") == FORMAT):
            raise ValueError(
                f"--out {out} is not empty and holds no inspect.json from perceiver-ar inspect: "
                "choose a new or empty folder"
            )
    return target


def inspect_store(
    model: PerceiverAR,
    data_dir: str,
    out: str | Path,
    split: str = "validation",
    document: int = 0,
    start: int = 0,
    length: int | None = None,
    position_block: int | None = None,
    latent_block: int | None = None,
    heads: bool = True,
) -> dict[str, Any]:
    """Draw the cross-attend weights for inputs [start, start + length) of a store's document.

    length defaults to the model's N (or what the document holds). ``out``
    is written whole or not at all (a temporary sibling renamed into place).
    Returns inspect.json's content plus the written files.
    """
    target = check_inspect_output(out, [str(data_dir)])
    store = TokenStore(data_dir)
    check_store(model.provenance, model.config.vocab_size, store.meta, str(data_dir))
    if split not in store.split_names:
        raise ValueError(f"the store has no split {split!r}: choose one of {store.split_names}")
    docs = store.split(split)
    if not 0 <= document < len(docs):
        raise ValueError(f"--doc {document} is out of range: the {split} split holds {len(docs)} documents")
    doc = np.asarray(docs[document])
    N = model.config.context_len
    if not 0 <= start < len(doc):
        raise ValueError(f"--start {start} lies outside document {document} ({len(doc)} tokens)")
    length = min(N, len(doc) - start) if length is None else int(length)
    if not 1 <= length <= N:
        raise ValueError(f"--length {length} must be in [1, N={N}] (the model's context)")
    if start + length > len(doc):
        raise ValueError(
            f"--start {start} --length {length} runs past the end of document {document} ({len(doc)} tokens)"
        )
    device = next(model.parameters()).device
    inputs = torch.from_numpy(doc[start : start + length].astype(np.int64))[None].to(device)
    positions = torch.from_numpy(positions_for_crop(store.meta, start, length))[None].to(device)
    amap = cross_attention_map(model, inputs, positions, position_block, latent_block)
    amap.extra.update(split=split, document=document, start=start, length=length)
    name = store.meta.get("documents", {}).get(split, [None] * len(docs))[document]
    if name:
        amap.extra["document_name"] = name
    title = f"{split} document {name or document}, inputs {start}..{start + length - 1}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target, "inspect")
    try:
        files = write_attention_maps(amap, tmp, title, heads)
        publish_dir(tmp, target)
    except BaseException:
        remove_temp(tmp)
        raise
    files = {k: str(target / Path(v).name) for k, v in files.items()}
    return {**amap.summary(), "files": files}
