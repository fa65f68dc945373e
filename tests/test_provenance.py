"""A model records the data it was trained on; eval, generate, render and train refuse data that differs."""

import json

import numpy as np
import pytest
import torch

from perceiver_ar import PerceiverAR, PerceiverARConfig
from perceiver_ar.cli import main
from perceiver_ar.data import prepare_text
from perceiver_ar.evaluate import evaluate_store
from perceiver_ar.modalities.audio import prepare_audio
from perceiver_ar.provenance import from_store_meta
from perceiver_ar.store import TokenStore
from perceiver_ar.train import train
from tests.conftest import tiny_train_config
from tests.test_data import make_corpus


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A byte store, a BPE store with the same V = 259, and a mu-law audio store (V = 259 too)."""
    import wave

    root = tmp_path_factory.mktemp("provenance")
    make_corpus(root / "corpus", num_docs=4, base_len=200)
    byte = prepare_text([root / "corpus"], root / "bytes", validation_fraction=0.5)
    bpe = prepare_text(
        [root / "corpus"], root / "bpe", tokenizer="bpe", bpe_vocab_size=259, validation_fraction=0.5
    )
    (root / "wav").mkdir()
    for i in range(3):
        with wave.open(str(root / "wav" / f"w{i}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(800)
            w.writeframes((np.sin(np.arange(800) * (0.1 + i)) * 9000).astype("<i2").tobytes())
    audio = prepare_audio(
        [root / "wav"], root / "audio", rate=800, test_fraction=0.0, validation_fraction=0.34
    )
    assert TokenStore(bpe).vocab_size == TokenStore(byte).vocab_size == TokenStore(audio).vocab_size == 259
    return {"root": root, "bytes": str(byte), "bpe": str(bpe), "audio": str(audio)}


def model_for(store_dir, directory):
    """A small model saved with the provenance of ``store_dir`` (as train writes it)."""
    torch.manual_seed(0)
    cfg = PerceiverARConfig.from_preset("tiny", context_len=32, num_latents=8, input_dim=16, latent_dim=16)
    model = PerceiverAR(cfg)
    model.provenance = from_store_meta(TokenStore(store_dir).meta)
    model.save_pretrained(directory)
    return directory


def test_train_records_the_store_in_the_model(stores, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_config(stores["bpe"], run, model={"context_len": 32, "num_latents": 8}, steps=1))
    record = json.loads((run / "model" / "provenance.json").read_text())
    meta = TokenStore(stores["bpe"]).meta
    assert record["modality"] == "text" and record["tokenizer"] == meta["tokenizer"]  # the BPE itself
    assert PerceiverAR.from_pretrained(run).provenance == record


def test_eval_refuses_a_store_with_another_tokenizer_of_the_same_size(stores, tmp_path, capsys):
    model = PerceiverAR.from_pretrained(model_for(stores["bytes"], tmp_path / "m"))
    assert evaluate_store(model, stores["bytes"], max_tokens=16)["num_tokens"] > 0
    with pytest.raises(
        ValueError, match=r"trained on text, bytes tokenizer \(V=259\).*holds text, bpe tokenizer"
    ):
        evaluate_store(model, stores["bpe"], max_tokens=16)
    assert main(["eval", str(tmp_path / "m"), "--data", stores["audio"]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trained on text" in err and "holds audio at 800 Hz" in err


def test_train_init_from_refuses_other_data(stores, tmp_path):
    model_for(stores["bytes"], tmp_path / "m")
    cfg = tiny_train_config(stores["audio"], tmp_path / "run", init_from=str(tmp_path / "m"), steps=1)
    with pytest.raises(ValueError, match="was trained on text"):
        train(cfg)


def test_generate_uses_the_models_tokenizer_and_refuses_another(stores, tmp_path, capsys):
    model_for(stores["bpe"], tmp_path / "bpe_model")
    model_for(stores["audio"], tmp_path / "audio_model")
    args = ["--prompt", "the quick", "--max-new-tokens", "3", "--seed", "0", "--temperature", "0"]
    assert main(["generate", str(tmp_path / "bpe_model"), *args]) == 0  # its own BPE, found without help
    assert capsys.readouterr().out.startswith("the quick")
    assert main(["generate", str(tmp_path / "bpe_model"), *args, "--tokenizer", stores["bpe"]]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "bpe_model"), *args, "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err
    assert "trained with the bpe tokenizer (V=259, id" in err and "holds the bytes tokenizer (V=259)" in err
    assert main(["generate", str(tmp_path / "audio_model"), *args]) == 2
    assert "was trained on audio data" in capsys.readouterr().err


def test_render_refuses_a_store_of_another_modality(stores, tmp_path, capsys):
    model_for(stores["bytes"], tmp_path / "m")
    assert main(["render", str(tmp_path / "m"), "--data", stores["audio"], "--out", str(tmp_path / "r")]) == 2
    assert "trained on text" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_model_saved_before_provenance_still_loads_and_is_checked_by_vocabulary(stores, tmp_path, capsys):
    legacy = model_for(stores["bytes"], tmp_path / "m")
    (legacy / "provenance.json").unlink()
    (legacy / "MANIFEST.json").unlink()
    model = PerceiverAR.from_pretrained(legacy)
    assert model.provenance is None
    assert evaluate_store(model, stores["bpe"], max_tokens=16)["num_tokens"] > 0  # same V: nothing to tell
    assert main(["eval", str(legacy), "--data", stores["bytes"], "--max-tokens", "16"]) == 0
    assert "records no provenance" in capsys.readouterr().err
