"""Saving and loading model directories."""

import json

import pytest
import torch

from perceiver_ar import PerceiverAR, PerceiverARConfig


def tiny(**kw):
    torch.manual_seed(0)
    return PerceiverAR(PerceiverARConfig.from_preset("tiny", final_layer_init_zeros=False, **kw)).eval()


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_round_trip_gives_identical_logits(tmp_path, pe):
    model = tiny(position_encoding=pe, absolute_table="sinusoidal")
    model.save_pretrained(str(tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = PerceiverAR.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config == model.config
    x = torch.randint(3, 259, (2, 64))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PerceiverAR.from_pretrained(str(tmp_path / "nope"))
    tiny().save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))


def test_corrupt_weights(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))


def test_corrupt_config(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"bogus_field": 1}))
    with pytest.raises(ValueError, match="unknown PerceiverARConfig fields"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))


def test_config_and_weights_that_do_not_match(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["input_dim"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))
    cfg["input_dim"], cfg["num_latent_layers"] = 32, 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing tensors"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))


def test_a_training_run_directory_loads_its_published_model(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path / "run" / "model"))
    loaded = PerceiverAR.from_pretrained(str(tmp_path / "run")).eval()
    x = torch.randint(3, 259, (1, 64))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
