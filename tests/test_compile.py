"""Compile-clean: no host sync in the forward, one graph and no break, a bounded number of compiles.

Recompile counts depend on Dynamo's guards, not on the backend, so the
training-run test compiles with ``aot_eager`` (seconds); the one test that
runs Inductor on this CPU (30-60 s a graph) is marked slow.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch._dynamo

from perceiver_ar.samplers import check_batch
from perceiver_ar.train import train
from tests.conftest import make_model
from tests.test_model import random_batch
from tests.test_train import config, losses, store  # noqa: F401  (the module's data store fixture)


@contextlib.contextmanager
def no_host_reads():
    """Fail on any Python-level read of a tensor's value (``bool``, ``int``, ``item``, ``tolist``)."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called: a host sync")

        return method

    names = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_trusted_forward_never_reads_tensor_values(pe):
    """With full_rows given and validate=False, forward and backward never wait for the device."""
    model = make_model(pe, cross_attend_dropout=0.3, latent_dropout=0.2).train()
    full, padded = random_batch(2, 32), random_batch(2, 32, [32, 12])
    for x, full_rows in ((full, True), (padded, False), (full, False)):
        with no_host_reads():
            out = model(x, full_rows=full_rows, validate=False)
            out.logits.square().mean().backward()
    with no_host_reads(), torch.no_grad():
        model.eval()(full, full_rows=True, validate=False)
    # The guard sees reads: the public default reads the inputs to check them.
    with no_host_reads(), pytest.raises(AssertionError, match="a host sync"):
        model(full)


def test_public_forward_still_checks_its_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.full((1, 8), 300))
    with pytest.raises(ValueError, match="full_rows=True but the inputs hold padding"):
        model(random_batch(2, 32, [32, 12]), full_rows=True)
    x = random_batch(2, 32, [32, 12])
    with torch.no_grad():  # the default reads the inputs and takes the same path the caller would
        torch.testing.assert_close(model(x).logits, model(x, full_rows=False, validate=False).logits)
        full = random_batch(2, 32)
        assert torch.equal(model(full).logits, model(full, full_rows=True, validate=False).logits)
        # full_rows=False on full rows builds masks: the same logits by another kernel
        torch.testing.assert_close(model(full, full_rows=False).logits, model(full).logits, atol=1e-5, rtol=0)


def explain(model, *args, **kwargs):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(*args, **kwargs)


def test_full_row_training_forward_is_one_graph_without_breaks():
    # Before: 5 graphs, 4 breaks on the tiny preset, all from Tensor.item()
    # (input validation and the full-row test in build_masks).
    model = make_model(cross_attend_dropout=0.2).train()
    x = random_batch(2, 32)
    result = explain(model, x, torch.arange(1, 33).expand(2, 32), full_rows=True, validate=False)
    assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons
    # The public default under compile: no validation, masks for any batch.
    result = explain(model.eval(), random_batch(2, 32, [32, 12]))
    assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons


def test_train_compile_compiles_each_graph_once(store, tmp_path, monkeypatch):  # noqa: F811
    """A run mixing full and short crops compiles one graph for each and never recompiles."""
    import perceiver_ar.train as train_module

    seen = []

    def recording_check(*args):
        seen.append(check_batch(*args))
        return seen[-1]

    monkeypatch.setattr(train_module, "check_batch", recording_check)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # N = 128 against documents of ~300 tokens: some batches hold a short crop.
    model = dict(context_len=128, num_latents=8)
    train(
        config(store, tmp_path / "run", model=model, steps=6, compile=True, eval_every=0, checkpoint_every=6)
    )
    assert set(seen) == {True, False}  # both kinds of batch came
    counters = torch._dynamo.utils.counters
    assert counters["frames"]["ok"] == 2, dict(counters["frames"])  # one graph per full_rows value
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert len(losses(tmp_path / "run")) == 6


@pytest.mark.slow
def test_train_compile_with_inductor_matches_eager(store, tmp_path):  # noqa: F811
    eager = tmp_path / "eager"
    compiled = tmp_path / "compiled"
    train(config(store, eager, steps=4, eval_every=0, checkpoint_every=4))
    torch._dynamo.reset()
    train(config(store, compiled, steps=4, eval_every=0, checkpoint_every=4, compile=True))
    a, b = losses(eager), losses(compiled)
    assert max(abs(a[s] - b[s]) for s in a) < 1e-3
