"""The compiled decode step: one graph, no break, a bounded number of compiles, the same tokens.

Graph counts and breaks are Dynamo's business, not the backend's, so these
tests compile with the ``eager`` backend (Dynamo traces, nothing is code
generated: seconds); the test that runs Inductor on this CPU (tens of
seconds a graph) is marked slow. A decode step also never reads a tensor
value back to the host, compiled or not.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from perceiver_ar.generate import _decode_latents, generate, generate_stream, prefill
from perceiver_ar.kv_cache import KVCache
from perceiver_ar.packed_decode import pack
from tests.conftest import make_model
from tests.test_compile import no_host_reads


def random_prompt(B, T, seed=0):
    return torch.randint(3, 259, (B, T), generator=torch.Generator().manual_seed(seed))


def primed(model, B=2, T=5, new=12):
    """A cache sized as generate sizes it, primed with a prompt: (cache, prompt, positions)."""
    prompt = random_prompt(B, T)
    cache = KVCache.for_model(model, B, T + new, new)
    positions = torch.arange(1, T + 1).expand(B, T)
    prefill(model, prompt, positions, 1, cache)
    return cache, prompt, positions


@pytest.mark.parametrize("packed", [False, True], ids=["model-step", "packed-step"])
@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_decode_step_is_one_graph_without_breaks(pe, packed):
    model = make_model(pe)
    weights = pack(model) if packed else None
    cache, prompt, positions = primed(model)
    token, position = prompt[:, -1:], positions[:, -1:] + 1
    with torch.no_grad():
        explained = torch._dynamo.explain(_decode_latents)(model, token, position, cache, weights)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        # A reset from the cache (four latents at once) is one graph too.
        cache.clear_latents()
        explained = torch._dynamo.explain(_decode_latents)(
            model, prompt[:, -4:], positions[:, -4:] + 1, cache, weights
        )
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("packed", [False, True], ids=["model-step", "packed-step"])
def test_decode_steps_never_read_tensor_values(packed):
    """Steps and a reset from the cache run without a single host read (no .item(), bool(), int())."""
    model = make_model()
    weights = pack(model) if packed else None
    cache, prompt, positions = primed(model)
    with torch.no_grad(), no_host_reads():
        for t in range(3):
            _decode_latents(model, prompt[:, -1:], positions[:, -1:] + 1 + t, cache, weights)
        cache.clear_latents()
        _decode_latents(model, prompt[:, -4:], positions[:, -4:] + 4, cache, weights)


def test_generation_across_a_reset_and_a_slide_compiles_twice():
    """One graph for the one-token step, one for the reset's fill; the slide and later steps reuse them."""
    model = make_model()
    N, M = model.config.context_len, model.config.num_latents
    prompt = random_prompt(2, 5)
    n_new = N + 2 * M  # past N inputs (the ring wraps) and through several resets
    torch._dynamo.reset()
    counters.clear()
    compiled = list(generate_stream(model, prompt, n_new, temperature=0, compile="eager"))
    modes = [s.mode for s in compiled]
    assert modes.count("reset") >= 3 and 5 + n_new > N
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    eager = list(generate_stream(model, prompt, n_new, temperature=0))
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a.tokens, b.tokens), f"step {a.index} ({a.mode})"
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    # A second generation of the same shapes compiles nothing new.
    generate(model, prompt, n_new, temperature=0, compile="eager")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_compile_needs_the_cache_and_a_backend_name():
    model = make_model()
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, random_prompt(1, 4), 3, use_cache=False, compile=True)
    with pytest.raises(ValueError, match="backend name"):
        generate(model, random_prompt(1, 4), 3, compile=3)


def test_cli_generate_compile_gives_the_eager_text(tmp_path, capsys, monkeypatch):
    """``perceiver-ar generate --compile`` decodes through the compiled step (here the eager backend)."""
    import sys

    from perceiver_ar.cli import main

    generation = sys.modules["perceiver_ar.generate"]  # the package's ``generate`` is the function

    make_model().save_pretrained(tmp_path / "model")
    args = ["generate", str(tmp_path / "model"), "--prompt", "to be", "--max-new-tokens", "20"]
    args += ["--temperature", "0", "--tokenizer", "bytes"]
    assert main(args) == 0
    eager = capsys.readouterr()
    compiled_decode = generation.compiled_decode
    backends = []

    def eager_backend(backend="inductor"):
        backends.append(backend)
        return compiled_decode("eager")

    monkeypatch.setattr(generation, "compiled_decode", eager_backend)
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert backends == ["inductor"] and "compiled" in compiled.err
    assert compiled.out == eager.out and len(eager.out) > len("to be")


@pytest.mark.slow
def test_inductor_decode_gives_the_eager_tokens():
    """The real thing: Inductor code for the step and the reset, the same greedy tokens as eager."""
    model = make_model()
    prompt = random_prompt(2, 5)
    n_new = 2 * model.config.num_latents + 4
    eager = generate(model, prompt, n_new, temperature=0)
    compiled = generate(model, prompt, n_new, temperature=0, compile=True)
    assert torch.equal(compiled.tokens, eager.tokens)
