"""Generation: prime / decode one token / reset, sampling, streaming (the cache: ``kv_cache.py``).

Cached generation follows the official sampler (sample_utils.py): the prompt
is primed with one forward that hosts a single latent and fills the caches;
each new token then costs one latent whose keys/values join the caches; when
the latent caches are full, a reset recomputes a fill of latents (M/2 by
default) on the newest inputs and refills them. The inputs' keys and values
are already in the cross-attend cache, so a reset reuses them (only a window
renumbered for an absolute position table is recomputed whole). Past N tokens
the window slides: the cross-attend cache is a ring over the last N inputs.
A decode step (and a reset) has static shapes, keeps the cache's counts on
the device and samples on the device; ``compile=True`` compiles it once
(``torch.compile``), as gpt-fast compiles its one-token step.

``use_cache=False`` runs the same sampler with every step recomputed from
scratch: a full forward over the window hosting as many latents as the cache
would hold. Until the window slides past N, the two paths compute the same
logits (the tests check this).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import packed_decode
from .config import PerceiverARConfig
from .kv_cache import KVCache
from .model import PerceiverAR
from .packed_decode import PackedWeights
from .sampling import DEFAULT_TEMPERATURE, allowed_ids, sample
from .vocab import PAD_ID

# ----------------------------------------------------------------------------
# Prefill, decode one token
# ----------------------------------------------------------------------------


@torch.no_grad()
def prefill(
    model: PerceiverAR, tokens: Tensor, positions: Tensor, num_latents: int, cache: KVCache | None
) -> Tensor:
    """One full forward over the window hosting ``num_latents`` latents. Next-token logits [B, V].

    With a cache, it is cleared and then filled with the keys/values of every
    input and every latent (the prime, or a reset). The window holds no
    padding and was checked where it entered (``_prepare_prompt``; drawn ids
    are never PAD), so the forward takes the full-row path without reading
    the tokens again.
    """
    if cache is not None:
        cache.clear()
    out = model(tokens, positions, num_latents=num_latents, cache=cache, full_rows=True, validate=False)
    return out.logits[:, -1]


@torch.no_grad()
def decode_one(model: PerceiverAR, token: Tensor, position: Tensor, cache: KVCache) -> Tensor:
    """The cached step: one new token [B] at ``position`` [B] hosts one latent. Logits [B, V]."""
    return model.decode_step(token[:, None], position[:, None], cache).logits[:, -1]


def _decode_latents(
    model: PerceiverAR,
    tokens: Tensor,
    positions: Tensor,
    cache: KVCache,
    weights: PackedWeights | None = None,
) -> Tensor:
    """A step (F = 1) or a reset from the cache (F = reset_fill, latent caches emptied first).

    tokens [B, F], positions [B, F]: the newest F inputs, each hosting a latent.
    The cross-attend ring already holds the rotated keys and values of every
    window input but the newest, so a reset computes only its F latents
    instead of the projections of all N inputs. With ``weights`` (packed for
    this generation, ``perceiver_ar.packed_decode``) the step reads them in
    the layout the CPU reads fastest. Next-token logits [B, V].
    """
    if weights is not None:
        return packed_decode.decode_step(model, weights, tokens, positions, cache)
    return model.decode_step(tokens, positions, cache).logits[:, -1]


# Where a decode step reads packed weights (``perceiver_ar.packed_decode``): the
# CPU, whose matrix-vector products read short-rowed weights at half speed. A
# GPU reads either layout at full speed, so there the copy would only cost memory.
PACKED_DEVICE_TYPES = ("cpu",)

# Compiled decode steps by torch.compile backend: one per process, like gpt-fast's.
# dynamic=False: a step and a reset have static shapes (one graph each per cache size).
_COMPILED: dict[str, Callable[..., Tensor]] = {}


def compiled_decode(backend: str = "inductor") -> Callable[..., Tensor]:
    """The decode step compiled by torch.compile: ``_decode_latents``'s arguments -> logits [B, V].

    fullgraph=True: the step has no graph break (tests/test_compile_decode.py
    checks one graph). The first call of each shape compiles (tens of seconds
    on a CPU), later ones reuse it.
    """
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_decode_latents, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[backend]


# ----------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------


class _History:
    """Every token so far with its position; the model sees the last N (the window).

    Positions are given for the prompt, and new tokens take the position after
    the last one; or they are given for every token to come (``planned``, the
    only way with several position axes). With one absolute position table, a
    window whose positions run past the table is renumbered to start at 1
    (``rebased``); rotary positions are relative, so they never need it.
    """

    def __init__(self, prompt: Tensor, positions: Tensor, max_new_tokens: int, config: PerceiverARConfig):
        B, T = prompt.shape
        total = T + max_new_tokens
        self.tokens = prompt.new_zeros(B, total)
        self.tokens[:, :T] = prompt
        self.planned = positions.shape[1] == total
        if self.planned:
            self.positions = positions.clone()
        else:
            self.positions = positions.new_zeros(B, total)
            self.positions[:, :T] = positions
        self.end = T
        self.context_len = config.context_len
        self.max_position = None  # set when the window may need renumbering
        if config.position_encoding == "absolute" and positions.dim() == 2:
            self.max_position = config.position_table_sizes[0] - 1
        self.shift = torch.zeros_like(positions[:, :1])  # [B, 1], subtracted from every position
        self.last_position = int(positions[:, T - 1].max())  # newest position in the window, shift applied
        self.rebased = False
        self._fit_table()

    @property
    def start(self) -> int:
        return max(0, self.end - self.context_len)

    def window(self) -> tuple[Tensor, Tensor]:
        """Tokens [B, W] and positions [B, W] (or [B, W, axes]) of the window."""
        s, e = self.start, self.end
        positions = self.positions[:, s:e]
        return self.tokens[:, s:e], (positions if self.max_position is None else positions - self.shift)

    def append(self, token: Tensor) -> None:
        self.tokens[:, self.end] = token
        self.rebased = False
        if not self.planned:
            self.positions[:, self.end] = self.positions[:, self.end - 1] + 1
            self.last_position += 1
        elif self.max_position is not None:
            self.last_position = int((self.positions[:, self.end] - self.shift[:, 0]).max())
        self.end += 1
        self._fit_table()

    def _fit_table(self) -> None:
        if self.max_position is None or self.last_position <= self.max_position:
            return
        self.shift = self.positions[:, self.start : self.start + 1] - 1
        self.last_position = int((self.positions[:, self.end - 1] - self.shift[:, 0]).max())
        if self.last_position > self.max_position:
            raise ValueError(
                f"the window's positions reach {self.last_position} but the absolute position table "
                f"has {self.max_position + 1} rows: build the model with larger position_table_sizes"
            )
        self.rebased = True


@dataclass
class GenerationStep:
    """One step of ``generate_stream``: one new token per row."""

    index: int  # 0 for the first new token
    tokens: Tensor  # [B] the new ids; PAD in rows that have already stopped
    logits: Tensor  # [B, V] the logits they were drawn from (before temperature and filters)
    mode: str  # "prime", "cached_step", "reset" (cached) or "recompute" (use_cache=False)
    num_latents: int  # latents in the forward that made the prediction (the cache's schedule)


def _prepare_prompt(model: PerceiverAR, prompt, positions, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    cfg = model.config
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt, device=device)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] < 1 or prompt.shape[0] < 1:
        raise ValueError(
            f"prompt must be [batch, length] token ids with length >= 1, got {tuple(prompt.shape)}"
        )
    if prompt.is_floating_point() or prompt.is_complex():
        raise ValueError(f"prompt must hold integer token ids, got {prompt.dtype}")
    prompt = prompt.long()
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}), got ids from {lo} to {hi}")
    if bool((prompt == PAD_ID).any()):
        raise ValueError(f"prompt must not contain PAD ({PAD_ID}): give every row the same, unpadded length")
    B, T = prompt.shape
    if positions is None:
        positions = torch.arange(1, T + 1, device=device).expand(B, T)
    positions = torch.as_tensor(positions, device=device)
    if positions.dim() == 3 and positions.shape[2] == 1:
        positions = positions[..., 0]
    total = T + max_new_tokens
    if positions.dim() not in (2, 3) or positions.shape[0] != B or positions.shape[1] not in (T, total):
        raise ValueError(
            f"positions must be [{B}, {T}] for the prompt or [{B}, {total}] for every token to come "
            f"(with a third axis for several position tables), got {tuple(positions.shape)}"
        )
    if positions.dim() == 3 and positions.shape[1] != total:
        raise ValueError(
            f"with several position axes, give the positions of every token to come: [{B}, {total}, axes]"
        )
    if positions.is_floating_point() or bool((positions < 0).any()):
        raise ValueError("positions must be integers >= 0 (1-based data positions)")
    if cfg.position_encoding == "absolute" and positions.dim() == 3:
        if positions.shape[2] != len(cfg.position_table_sizes):
            raise ValueError(
                f"positions have {positions.shape[2]} axes but the model has "
                f"{len(cfg.position_table_sizes)} position tables"
            )
        for axis, size in enumerate(cfg.position_table_sizes):
            if int(positions[..., axis].max()) >= size:
                raise ValueError(f"positions on axis {axis} run past the model's table of {size} rows")
    elif cfg.position_encoding == "absolute" and len(cfg.position_table_sizes) > 1:
        raise ValueError(
            f"the model has {len(cfg.position_table_sizes)} position tables: give positions "
            f"[{B}, {total}, {len(cfg.position_table_sizes)}] for every token to come"
        )
    return prompt, positions.long()


def generate_stream(
    model: PerceiverAR,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    reset_fill: int | None = None,
    positions: Tensor | None = None,
    stop_tokens: Sequence[int] | None = None,
    allowed_tokens: Sequence[int] | Tensor | None = None,
    compile: bool | str = False,
) -> Iterator[GenerationStep]:
    """An iterator of one ``GenerationStep`` per new token; the arguments are ``generate``'s.

    The iteration ends after ``max_new_tokens`` steps, or earlier once every
    row has produced a stop token. The model is put in eval mode while the
    iterator runs and returned to its mode when it finishes or is closed.
    """
    cfg = model.config
    M = cfg.num_latents
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # NaN fails this too
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    fill = max(M // 2, 1) if reset_fill is None else int(reset_fill)
    if not 1 <= fill <= M:
        raise ValueError(f"reset_fill must be in [1, num_latents={M}], got {reset_fill}")
    if not isinstance(compile, (bool, str)):
        raise ValueError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
    if compile and not use_cache:
        raise ValueError("compile compiles the cached decode step: it needs use_cache=True")
    prompt, positions = _prepare_prompt(model, prompt, positions, max_new_tokens)
    B = prompt.shape[0]
    device = prompt.device
    stop = None if not stop_tokens else torch.as_tensor(list(stop_tokens), device=device)
    if stop is not None and (
        stop.is_floating_point() or int(stop.min()) < 0 or int(stop.max()) >= cfg.vocab_size
    ):
        raise ValueError(f"stop_tokens must be ids in [0, {cfg.vocab_size}), got {list(stop_tokens)}")
    generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
    # Sized to this generation (at most N and M slots): a step reads every slot, so
    # none is kept that it never fills. Compiled, the sizes round up to a power of
    # two, so that generations of other lengths mostly reuse the compiled steps.
    cache = None
    if use_cache:
        # Latents: one per token, or a reset's fill (a renumbered window resets at once).
        inputs, latents = prompt.shape[1] + max_new_tokens, max(max_new_tokens, fill)
        if compile:
            inputs, latents = 1 << (inputs - 1).bit_length(), 1 << (latents - 1).bit_length()
        cache = KVCache.for_model(model, B, inputs, latents)
    history = _History(prompt, positions, max_new_tokens, cfg)
    allowed = allowed_ids(allowed_tokens, cfg.vocab_size, device)
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, allowed_tokens=allowed
    )
    decode = _decode_latents
    if compile:
        decode = compiled_decode("inductor" if compile is True else compile)
    if cache is not None and max_new_tokens > 1 and device.type in PACKED_DEVICE_TYPES:  # a step will run
        decode = functools.partial(decode, weights=packed_decode.pack(model))
    # Arguments are checked above, when generate_stream is called; the steps
    # run as the caller iterates.
    return _steps(model, history, cache, max_new_tokens, fill, sampling, stop, decode)


def _steps(
    model: PerceiverAR,
    history: _History,
    cache: KVCache | None,
    max_new_tokens: int,
    fill: int,
    sampling: dict,
    stop: Tensor | None,
    decode: Callable[[PerceiverAR, Tensor, Tensor, KVCache], Tensor],
) -> Iterator[GenerationStep]:
    M = model.config.num_latents
    use_cache = cache is not None
    done = torch.zeros(history.tokens.shape[0], dtype=torch.bool, device=history.tokens.device)
    was_training = model.training
    model.eval()
    try:
        num_latents = 0  # latents the cache holds (and a recompute hosts)
        for index in range(max_new_tokens):
            if index == 0:
                mode, num_latents = "prime", 1
            elif num_latents >= M or history.rebased:
                mode, num_latents = "reset", fill
            else:
                mode, num_latents = "cached_step", num_latents + 1
            tokens, pos = history.window()
            if not use_cache:
                mode = "recompute"
                logits = prefill(model, tokens, pos, num_latents, None)
            elif mode == "prime" or history.rebased:  # every input's embedding is new: a full forward
                logits = prefill(model, tokens, pos, num_latents, cache)
            else:  # a step (1 latent) or a reset (the fill) on the newest inputs, from the cache
                new_latents = 1
                if mode == "reset":
                    cache.clear_latents()
                    new_latents = num_latents
                with torch.no_grad():
                    logits = decode(model, tokens[:, -new_latents:], pos[:, -new_latents:], cache)
            token = sample(logits, **sampling)
            yield GenerationStep(index, token.masked_fill(done, PAD_ID), logits, mode, num_latents)
            if stop is not None:
                done |= torch.isin(token, stop)
                if bool(done.all()):
                    return
            if index + 1 < max_new_tokens:
                history.append(token)
    finally:
        model.train(was_training)


@dataclass
class GenerationOutput:
    """The result of ``generate``."""

    tokens: Tensor  # [B, max_new_tokens] new ids; PAD after a row's stop token
    num_generated: Tensor  # [B] new tokens per row, its stop token included
    prefill_seconds: float  # the prime: prompt to first token
    decode_seconds: float  # every later step
    num_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the first, summed over the batch."""
        steps = self.num_steps - 1
        return self.tokens.shape[0] * steps / self.decode_seconds if steps > 0 else float("nan")


def generate(
    model: PerceiverAR,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    reset_fill: int | None = None,
    positions: Tensor | None = None,
    stop_tokens: Sequence[int] | None = None,
    allowed_tokens: Sequence[int] | Tensor | None = None,
    compile: bool | str = False,
) -> GenerationOutput:
    """Continue each row of ``prompt`` by up to ``max_new_tokens`` tokens.

    prompt: [B, T] token ids without padding (a 1-D prompt is one row); longer
    than N, only its last N tokens are seen. temperature 0 is greedy; top_k and
    top_p filter before drawing; seed makes the draws reproducible (a
    ``torch.Generator``). use_cache=False recomputes every step from scratch.
    reset_fill: latents a reset keeps (default M/2, as the official sampler).
    positions: [B, T] 1-based positions of the prompt (default 1..T), new
    tokens continuing from the last; or [B, T + max_new_tokens] (or
    [B, T + max_new_tokens, axes] for several position tables) for every token
    to come. stop_tokens end a row once drawn. allowed_tokens: the only ids
    that may be drawn (default: any but PAD), for example an image model's
    pixel ids ``range(3, 259)``. compile: compile the cached decode step with
    ``torch.compile`` (True: Inductor; a string names another backend); the
    first generation of a shape pays the compilation.
    """
    steps = generate_stream(
        model,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        use_cache=use_cache,
        reset_fill=reset_fill,
        positions=positions,
        stop_tokens=stop_tokens,
        allowed_tokens=allowed_tokens,
        compile=compile,
    )
    device = next(model.parameters()).device
    B = 1 if torch.as_tensor(prompt).dim() == 1 else len(prompt)
    tokens = torch.full((B, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
    num_generated = torch.zeros(B, dtype=torch.long, device=device)
    start = time.perf_counter()
    first = start
    num_steps = 0
    for step in steps:
        tokens[:, step.index] = step.tokens
        num_generated += (step.tokens != PAD_ID).long()
        num_steps += 1
        if step.index == 0:
            _sync(device)
            first = time.perf_counter()
    _sync(device)
    end = time.perf_counter()
    return GenerationOutput(tokens, num_generated, first - start, end - first, num_steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
