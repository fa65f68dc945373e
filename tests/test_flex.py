"""The CUDA cross-attend (FlexAttention) exercised on the CPU: block tables, eager flex == SDPA, the model.

On CUDA ``scaled_dot_product`` runs the cross-attend as compiled
FlexAttention with a block mask built from indices. The CPU has flex only
eagerly and without a backward, which is enough to check here that the block
tables are exact, that flex with them computes what masked SDPA computes
(the eager path reads the tables too: a wrong table changes its output),
and that the whole model, forced down the CUDA kernel choice, gives the CPU
path's logits.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from perceiver_ar import attention
from perceiver_ar.attention import CrossMask, cross_block_mask, prefix_causal_block_mask
from tests.conftest import make_model
from tests.test_model import random_batch

flex = pytest.importorskip("torch.nn.attention.flex_attention")
BLOCK = 16  # small blocks, so toy lengths span several


def eager_flex(q, k, v, block_mask):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": here that is the point
        return flex.flex_attention(q, k, v, block_mask=block_mask)


def cross_masks(B=3, Lq=20, Lk=70, seed=0):
    """CrossMasks of the cases the model builds: full rows, padded rows (with invalid latents), dropout."""
    g = torch.Generator().manual_seed(seed)
    full = torch.arange(Lk - Lq, Lk)[None].expand(B, Lq)
    lengths = torch.tensor([Lk, 45, 9])[:B]
    index = lengths[:, None] - Lq + torch.arange(Lq)
    padded = torch.where(index >= 0, index, Lk - 1)  # invalid latents see every key (then uniform)
    keep = torch.rand(B, Lk, generator=g) > 0.4
    return {
        "full": CrossMask(full),
        "padded": CrossMask(padded),
        "full+dropout": CrossMask(full, keep),
        "padded+dropout": CrossMask(padded, keep),
    }


def block_sets(mask, Lq, Lk):
    """What the tables must say, from the dense mask: visited blocks (any key seen), full blocks (all)."""
    dense = mask.dense(Lk)[:, 0]
    B = dense.shape[0]
    nq, nk = -(-Lq // BLOCK), -(-Lk // BLOCK)
    seen = torch.zeros(B, nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    seen[:, :Lq, :Lk] = dense
    every = torch.ones_like(seen)  # rows past Lq do not count; keys past Lk are not seen
    every[:, :Lq, :] = False
    every[:, :Lq, :Lk] = dense
    blocks = (B, nq, BLOCK, nk, BLOCK)
    return seen.view(blocks).any(4).any(2), every.view(blocks).all(4).all(2)


def tables_to_sets(num, indices, nk):
    """The block pairs a (num_blocks, indices) table lists, as a [B, nq, nk] boolean."""
    B, _, nq, _ = indices.shape
    out = torch.zeros(B, nq, nk, dtype=torch.bool)
    for b in range(B):
        for qb in range(nq):
            out[b, qb, indices[b, 0, qb, : num[b, 0, qb]].long()] = True
    return out


@pytest.mark.parametrize("case", ["full", "padded", "full+dropout", "padded+dropout"])
def test_block_tables_are_exact(case):
    Lq, Lk = 20, 70
    mask = cross_masks(Lq=Lq, Lk=Lk)[case]
    bm = cross_block_mask(mask, Lk, block=BLOCK)
    nk = -(-Lk // BLOCK)
    partial = tables_to_sets(bm.kv_num_blocks, bm.kv_indices, nk)
    full = tables_to_sets(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    seen, all_seen = block_sets(mask, Lq, Lk)
    assert not (partial & full).any()
    assert torch.equal(partial | full, seen)  # every block with a visible key, and no other
    if mask.keep is None:
        assert torch.equal(full, all_seen)  # full exactly where every query sees every key
    else:
        assert not full.any()  # dropout: every visited block evaluates the mask
    # torch's own construction from the mask function visits the same blocks
    reference = flex.create_block_mask(
        bm.mask_mod, mask.last.shape[0], 1, Lq, Lk, device="cpu", BLOCK_SIZE=BLOCK
    )
    assert torch.equal(reference.to_dense().bool(), (partial | full)[:, None])


def test_prefix_causal_block_mask_is_shared_by_the_batch():
    bm = prefix_causal_block_mask(20, 70, torch.device("cpu"), block=BLOCK)
    assert bm.kv_num_blocks.shape[0] == 1
    ref = cross_block_mask(CrossMask(torch.arange(50, 70)[None]), 70, block=BLOCK)
    assert torch.equal(bm.to_dense(), ref.to_dense())
    q = torch.arange(20)[:, None]
    kv = torch.arange(70)[None]
    assert torch.equal(bm.mask_mod(0, 0, q, kv), kv <= q + 50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_flex_equals_masked_sdpa(dtype):
    g = torch.Generator().manual_seed(1)
    B, H, Lq, Lk, dh = 3, 2, 20, 70, 16
    q, k, v = (torch.randn(B, H, n, dh, generator=g).to(dtype) for n in (Lq, Lk, Lk))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for case, mask in cross_masks(B, Lq, Lk).items():
            out = eager_flex(q, k, v, cross_block_mask(mask, Lk, block=BLOCK))
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(Lk))
            torch.testing.assert_close(out, ref, atol=tol, rtol=0, msg=case)
        out = eager_flex(q, k, v, prefix_causal_block_mask(Lq, Lk, q.device, block=BLOCK))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attention.band_mask(Lq, Lk, q.device))
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)


@contextlib.contextmanager
def cuda_kernel_choice(monkeypatch, kernel=eager_flex):
    """Make the CPU take the kernels CUDA takes: FlexAttention (eagerly) for the cross-attend."""
    with monkeypatch.context() as m:
        m.setattr(attention, "use_flex", lambda q: True)
        m.setattr(attention, "FLEX_BLOCK", BLOCK)
        m.setattr(attention, "flex_kernel", lambda: kernel)
        m.setattr(attention.PrefixCausalAttention, "apply", None)  # the CPU kernel must not run
        yield


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_model_on_the_cuda_kernels_gives_the_cpu_logits(pe, monkeypatch):
    model = make_model(pe, context_len=70, num_latents=20, input_dim=32, cross_attend_heads=2)
    batches = {"full": random_batch(2, 70), "padded": random_batch(3, 70, [70, 45, 9])}
    with torch.no_grad():
        ref = {name: model(x).logits for name, x in batches.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = model(batches["padded"]).logits
        with cuda_kernel_choice(monkeypatch):
            for name, x in batches.items():
                torch.testing.assert_close(model(x).logits, ref[name], atol=1e-5, rtol=0, msg=name)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(batches["padded"]).logits
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref_bf16.float(), atol=0.1, rtol=0)


def test_the_flex_forward_traces_as_one_graph(monkeypatch):
    model = make_model(context_len=70, num_latents=20, input_dim=32, cross_attend_heads=2)
    # Under compile flex_kernel() is the plain flex_attention, traced into the graph.
    with cuda_kernel_choice(monkeypatch, flex.flex_attention), torch.no_grad():
        for x, full_rows in ((random_batch(2, 70), True), (random_batch(3, 70, [70, 45, 9]), False)):
            torch._dynamo.reset()
            result = torch._dynamo.explain(model)(x, full_rows=full_rows, validate=False)
            assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons


@pytest.mark.parametrize("native", [True, False], ids=["isolated-compile", "patched-limit"])
def test_compiled_flex_gets_its_own_recompile_budget(native, monkeypatch):
    """Past Dynamo's limit of 8 variants torch runs flex unfused (every N x M score materialised).

    Seen on an H200 (docs/gpu.md): mask functions x grad mode x autocast x dtype
    reach 8 in one process; eager training then ran 1.2-1.7x slower. The kernel's
    compile keeps up to 64 variants, through torch.compile's own per-compile limit
    where torch has one, else by raising the limit for its own calls only.
    """
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    if native and "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        pytest.skip("this torch has no per-compile recompile limit")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)

    def scale(x, k):  # one compiled variant per value of k
        return x * k

    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter, dynamic=False))
    torch._dynamo.reset()
    try:
        compiled = attention.compile_with_budget(scale, native=native)
        for k in range(12):
            assert compiled(torch.ones(3), k)[0] == k
        assert counter.frame_count == 12  # 12 > 8 variants compiled, none left to run eagerly
        assert getattr(config, name) == before  # the process's own limit is untouched
    finally:
        torch._dynamo.reset()


def test_flex_kernel_is_compiled_with_the_budget(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "compile_with_budget", lambda fn: calls.append(fn) or fn)
    monkeypatch.setattr(attention, "_compiled_flex", None)
    assert attention.flex_kernel() is attention.flex_attention
    assert calls == [attention.flex_attention]
