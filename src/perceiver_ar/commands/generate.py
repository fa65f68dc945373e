"""``perceiver-ar generate``: continue a text prompt with a saved model, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .checks import (
    NO_VERIFY_HELP,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    probability_mass,
)


def register(sub: argparse._SubParsersAction) -> None:
    from ..generate import DEFAULT_TEMPERATURE
    from ..runtime import INFERENCE_PRECISION_HELP

    p = sub.add_parser(
        "generate",
        help="continue a text prompt with a saved model, streaming the text as it is produced",
        description="Generate text with a model directory (config.json + model.safetensors). The text "
        "streams to stdout as it is produced; timing goes to stderr at the end.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="model directory written by save_pretrained or training",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text (UTF-8)")
    p.add_argument("--max-new-tokens", type=positive_int, required=True, help="tokens to generate per sample")
    p.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=DEFAULT_TEMPERATURE,
        help=f"softmax temperature; 0 is greedy (default {DEFAULT_TEMPERATURE:g}, the library's)",
    )
    p.add_argument("--top-k", type=positive_int, default=None, help="draw only from the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=probability_mass,
        default=None,
        help="draw only from the smallest set holding p of the mass",
    )
    p.add_argument("--seed", type=nonnegative_int, default=None, help="random seed, for reproducible samples")
    p.add_argument(
        "--num-samples", type=positive_int, default=1, help="samples generated together as one batch"
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TOKEN",
        help="stop a sample at this token: an id, or text that is one token (repeatable); EOS always stops",
    )
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--no-sos", action="store_true", help="do not start the prompt with the SOS token")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="data store directory or JSON file holding the tokenizer, or 'bytes'; it must be the model's "
        "own (default: the tokenizer the model records; a model saved before it recorded one: tokenizer.json "
        "or meta.json beside the model or in its parent, else the store its training run names, else bytes)",
    )
    p.add_argument(
        "--reset-fill",
        type=positive_int,
        default=None,
        help="latents kept when the cache resets (default M/2)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute every step from scratch (slow; for checks)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the cached decode step with torch.compile (Inductor): faster tokens once the "
        "first step of each shape has compiled (tens of seconds on a CPU)",
    )
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="auto", help=INFERENCE_PRECISION_HELP)
    p.set_defaults(func=run, must_exist={"model": ("MODEL", "dir"), "prompt_file": ("--prompt-file", "file")})


# Modalities whose tokens are text: generate encodes the prompt and decodes the sample.
TEXT_MODALITIES = ("text", "copy")


def _tokenizer_from_json(d: dict):
    from ..tokenizer import BPETokenizer, tokenizer_from_dict

    if isinstance(d.get("tokenizer"), dict):  # a store's meta.json
        d = d["tokenizer"]
    if d.get("type") in ("bytes", "bpe"):
        return tokenizer_from_dict(d)
    if "model" in d:  # a tokenizers-library JSON file
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(json.dumps(d)))
    return None


def load_tokenizer(model_dir: Path, spec: str | None, vocab_size: int, provenance: dict | None = None):
    """The model's own tokenizer (its provenance), or the one ``spec`` names, which must be the same.

    A model saved before provenance existed falls back to the old search:
    ``spec``, else tokenizer.json or meta.json beside the model or in its
    parent, else the store its training run names, else UTF-8 bytes; then
    only the vocabulary size can be checked.
    """
    from ..provenance import check_tokenizer
    from ..tokenizer import tokenizer_from_dict

    if provenance is not None:
        modality = provenance.get("modality")
        if modality not in TEXT_MODALITIES:
            raise ValueError(
                f"{model_dir} was trained on {modality} data and generate writes text: "
                "use `perceiver-ar render` for image, music and audio models"
            )
        own = tokenizer_from_dict(provenance["tokenizer"])
        if spec is None:
            return own
        given = _tokenizer_from_spec(spec)
        check_tokenizer(provenance, given.to_dict(), f"--tokenizer {spec}", str(model_dir))
        return given
    tok = _tokenizer_from_spec(spec) if spec is not None else _tokenizer_near(model_dir)
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is {vocab_size}: "
            "pass the data store the model was trained on with --tokenizer"
        )
    return tok


def _tokenizer_from_spec(spec: str):
    """The tokenizer ``--tokenizer`` names: 'bytes', a data store, or a JSON file."""
    from ..tokenizer import ByteTokenizer

    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {spec}: give a data store directory or a JSON file")
    tok = _read_tokenizer(path)
    if tok is None:
        raise ValueError(f"{path} does not hold a tokenizer")
    return tok


def _tokenizer_near(model_dir: Path):
    """A legacy model's tokenizer: a file beside it, the store its run names, else UTF-8 bytes."""
    from ..run_dir import TRAIN_CONFIG
    from ..tokenizer import ByteTokenizer

    candidates = [d / name for d in (model_dir, model_dir.parent) for name in ("tokenizer.json", "meta.json")]
    # A training run (run/model or run/checkpoints/step_N) names its data store.
    for run_dir in (model_dir.parent, model_dir.parent.parent):
        train_config = run_dir / TRAIN_CONFIG
        if train_config.is_file():
            data = json.loads(train_config.read_text()).get("data")
            if data:
                candidates.append(Path(data) / "meta.json")
            break
    for path in candidates:
        if path.is_file():
            tok = _read_tokenizer(path)
            if tok is not None:
                return tok
    return ByteTokenizer()


def _read_tokenizer(path: Path):
    try:
        return _tokenizer_from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path} does not hold a tokenizer: {e}") from None


class TextStream:
    """Decode ids as they come; hold back a token that ends inside a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending)
        self.pending = []
        return text


def _stop_ids(tokenizer, stops: list[str], ignore_eos: bool) -> list[int]:
    from ..vocab import EOS_ID

    ids = [] if ignore_eos else [EOS_ID]
    for s in stops:
        if s.lstrip("-").isdigit():
            ids.append(int(s))
            continue
        enc = tokenizer.encode(s)
        if len(enc) != 1:
            raise ValueError(f"--stop {s!r} is {len(enc)} tokens; give one token (or its id)")
        ids.append(enc[0])
    return ids


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import resolve_model_dir
    from ..generate import generate_stream
    from ..model import PerceiverAR
    from ..runtime import setup_runtime
    from ..vocab import SOS_ID

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.num_samples < 1:
        raise ValueError("--num-samples must be >= 1")
    if args.compile and args.no_cache:
        raise ValueError("--compile compiles the cached decode step: drop --no-cache")
    model_dir = resolve_model_dir(args.model)
    # The runtime picks the device and the dtype the model is cast to (fp32 on a CPU).
    rt = setup_runtime(args.device, args.precision)
    device = rt.device
    model = PerceiverAR.from_pretrained(str(model_dir), map_location=device, verify=not args.no_verify)
    model = rt.for_inference(model)
    if model.provenance is None:
        print(
            f"note: {model_dir} records no provenance (saved before provenance.json): its tokenizer is "
            "looked for beside it and checked by vocabulary size only",
            file=sys.stderr,
        )
    tokenizer = load_tokenizer(model_dir, args.tokenizer, model.config.vocab_size, model.provenance)
    text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    ids = ([] if args.no_sos else [SOS_ID]) + tokenizer.encode(text)
    if not ids:
        raise ValueError("the prompt is empty: give some text, or drop --no-sos")
    prompt = torch.tensor([ids] * args.num_samples, device=device)
    steps = generate_stream(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
        reset_fill=args.reset_fill,
        stop_tokens=_stop_ids(tokenizer, args.stop, args.ignore_eos),
        compile=args.compile,
    )

    streams = [TextStream(tokenizer) for _ in range(args.num_samples)]
    texts = [""] * args.num_samples
    live = args.num_samples == 1  # one sample streams; several are printed at the end
    if live:
        sys.stdout.write(text)
        sys.stdout.flush()
    start = time.perf_counter()
    first = None
    num_tokens = 0
    for step in steps:
        if first is None:
            first = time.perf_counter()
        for b, token in enumerate(step.tokens.tolist()):
            if token:  # PAD marks a row that has stopped
                num_tokens += 1
                texts[b] += streams[b].push(token)
        if live:
            sys.stdout.write(texts[0])
            sys.stdout.flush()
            texts[0] = ""
    end = time.perf_counter()
    for b, stream in enumerate(streams):
        texts[b] += stream.flush()
    if live:
        sys.stdout.write(texts[0] + "\n")
    else:
        for b, sample in enumerate(texts):
            sys.stdout.write(f"=== sample {b + 1} ===\n{text}{sample}\n")
    sys.stdout.flush()
    first = first or end
    decode_tokens = num_tokens - args.num_samples
    rate = decode_tokens / (end - first) if end > first and decode_tokens > 0 else float("nan")
    print(
        f"[{num_tokens} tokens in {end - start:.2f} s: prefill {first - start:.3f} s, "
        f"{rate:.1f} tokens/s after the first, {'no cache' if args.no_cache else 'cached'}"
        f"{', compiled' if args.compile else ''}, "
        f"{device}, {str(rt.dtype).removeprefix('torch.')}]",
        file=sys.stderr,
    )
    return 0
