"""Which data a model was trained on, and whether a store or tokenizer matches it.

A model's ``provenance.json`` (written by ``train`` from the store's
meta.json) records the modality, the tokenizer (the whole tokenizer for BPE,
its type for the fixed vocabularies: bytes, image levels, MIDI events,
mu-law audio), the vocabulary size and the token layout (SOS/EOS, image
shape and position rule, sample rate). ``eval``, ``generate``, ``render`` and
``train --init-from`` refuse a store or tokenizer that differs, naming both.

Models saved before provenance existed have none: they are checked by
vocabulary size only (a store's ids must fit the model), as before.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT = "perceiver-ar-provenance/1"
# The store facts that change what a token id means (the store's document
# names, counts and source path do not).
LAYOUT_KEYS = ("sos", "eos", "image_shape", "image_positions", "sample_rate")


def store_tokenizer(meta: dict[str, Any]) -> dict[str, Any]:
    """A store's tokenizer as a dict (text: meta.json's ``tokenizer``; other modalities: ``vocabulary``)."""
    tok = meta.get("tokenizer", meta.get("vocabulary"))
    if isinstance(tok, str):
        return {"type": tok}
    if isinstance(tok, dict):
        return tok
    return {"type": "unknown", "vocab_size": meta.get("vocab_size")}


def from_store_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The provenance record of a model trained on the store with this meta.json."""
    return {
        "format": FORMAT,
        "modality": meta.get("modality", "text"),
        "vocab_size": int(meta["vocab_size"]),
        "tokenizer": store_tokenizer(meta),
        "layout": {k: meta[k] for k in LAYOUT_KEYS if k in meta},
    }


def tokenizer_id(tokenizer: dict[str, Any]) -> str:
    """A short fingerprint of a tokenizer dict: equal tokenizers, equal fingerprints.

    A BPE tokenizer's ``json`` (the tokenizers library's own file) is compared
    as the JSON object it holds, not as text.
    """
    canonical = dict(tokenizer)
    if isinstance(canonical.get("json"), str):
        canonical["json"] = json.loads(canonical["json"])
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:12]


def describe_tokenizer(tokenizer: dict[str, Any]) -> str:
    """``bytes tokenizer (V=259)``; a learnt one also shows its fingerprint (type and size do not tell)."""
    parts = [f"V={tokenizer['vocab_size']}"] if tokenizer.get("vocab_size") is not None else []
    if "json" in tokenizer:
        parts.append(f"id {tokenizer_id(tokenizer)}")
    return f"{tokenizer.get('type', 'unknown')} tokenizer" + (f" ({', '.join(parts)})" if parts else "")


def describe(record: dict[str, Any]) -> str:
    """``text, bpe tokenizer (V=300, id 1a2b3c4d5e6f)``, ``image 28x28x1, image tokenizer (V=259)``..."""
    modality = record.get("modality", "text")
    shape = record.get("layout", {}).get("image_shape")
    if shape:
        modality += " " + "x".join(str(s) for s in shape)
    rate = record.get("layout", {}).get("sample_rate")
    if rate:
        modality += f" at {rate} Hz"
    return f"{modality}, {describe_tokenizer(record.get('tokenizer', {}))}"


def mismatch(model: dict[str, Any], data: dict[str, Any]) -> bool:
    """Whether two provenance records describe different token meanings."""
    return (
        model.get("modality") != data.get("modality")
        or tokenizer_id(model.get("tokenizer", {})) != tokenizer_id(data.get("tokenizer", {}))
        or model.get("vocab_size") != data.get("vocab_size")
        or model.get("layout", {}) != data.get("layout", {})
    )


def check_store(
    provenance: dict[str, Any] | None,
    model_vocab_size: int,
    meta: dict[str, Any],
    store_name: str,
    model_name: str = "",
) -> str | None:
    """Refuse a store whose data is not the kind the model was trained on; returns a note or None.

    Without provenance (a model saved before it existed) only the vocabulary
    is checked, and the returned note says so.
    """
    data = from_store_meta(meta)
    model = f"the model {model_name}".rstrip()
    if provenance is None:
        if data["vocab_size"] > model_vocab_size:
            raise ValueError(
                f"the store {store_name} has vocab_size {data['vocab_size']} but {model} only "
                f"{model_vocab_size}: use a store prepared with the model's tokenizer"
            )
        return (
            f"note: {model} records no provenance (it was saved before provenance.json existed): "
            f"the store {store_name} is checked by vocabulary size only"
        )
    if mismatch(provenance, data):
        raise ValueError(
            f"{model} was trained on {describe(provenance)} but the store {store_name} holds "
            f"{describe(data)}: use a store prepared like the model's training data"
        )
    return None


def check_tokenizer(
    provenance: dict[str, Any], tokenizer: dict[str, Any], source: str, model_name: str = ""
) -> None:
    """Refuse a tokenizer (its ``to_dict()``) that is not the one the model was trained with."""
    expected = provenance.get("tokenizer", {})
    model = f"the model {model_name}".rstrip()
    if tokenizer_id(expected) != tokenizer_id(tokenizer):
        raise ValueError(
            f"{model} was trained with the {describe_tokenizer(expected)} but {source} holds the "
            f"{describe_tokenizer(tokenizer)}: leave out --tokenizer to use the model's own"
        )
