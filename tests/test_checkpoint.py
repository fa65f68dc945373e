"""Saving and loading model directories: round trips, checksums, header and config checks, provenance."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from perceiver_ar import PerceiverAR, PerceiverARConfig


def tiny(**kw):
    torch.manual_seed(0)
    return PerceiverAR(PerceiverARConfig.from_preset("tiny", final_layer_init_zeros=False, **kw)).eval()


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_round_trip_gives_identical_logits(tmp_path, pe):
    model = tiny(position_encoding=pe, absolute_table="sinusoidal")
    model.save_pretrained(str(tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "MANIFEST.json",
        "config.json",
        "model.safetensors",
    ]
    loaded = PerceiverAR.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config == model.config and loaded.provenance is None
    x = torch.randint(3, 259, (2, 64))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_provenance_is_saved_and_comes_back(tmp_path):
    model = tiny()
    model.provenance = {"format": "perceiver-ar-provenance/1", "modality": "text", "vocab_size": 259}
    model.save_pretrained(tmp_path / "m")
    assert PerceiverAR.from_pretrained(tmp_path / "m").provenance == model.provenance
    model.provenance = None
    model.save_pretrained(tmp_path / "m")  # saved again without: the old record must not survive
    assert PerceiverAR.from_pretrained(tmp_path / "m").provenance is None


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PerceiverAR.from_pretrained(str(tmp_path / "nope"))
    tiny().save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))


def flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_catch_a_changed_byte_and_verify_false_skips_them(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    flip_byte(tmp_path / "m" / "model.safetensors")  # same size: only the checksum can tell
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256.*verify=False"):
        PerceiverAR.from_pretrained(tmp_path / "m")
    PerceiverAR.from_pretrained(tmp_path / "m", verify=False)  # trusted: loads (the byte is a weight)


def test_corrupt_weights(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or was changed.*model.safetensors has"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"), verify=False)


def test_corrupt_config(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="not valid JSON"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"), verify=False)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"bogus_field": 1}))
    with pytest.raises(ValueError, match="unknown PerceiverARConfig fields"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"), verify=False)


def edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change", [{"num_latents": 8}, {"latent_heads": 2}, {"input_dim": 64}])
def test_a_config_that_contradicts_the_weights_is_refused(tmp_path, change):
    """Even sizes that leave no trace in a weight shape (M, heads): the weights' header keeps the config."""
    tiny().save_pretrained(str(tmp_path / "m"))
    edit_config(tmp_path / "m", **change)
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"contradicts the config saved with its weights: {name}"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"), verify=False)


def strip_header_config(directory):
    """The weights as a file written before the config was kept in the header."""
    path = directory / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})
    (directory / "MANIFEST.json").unlink()


def test_shapes_are_checked_from_the_header_of_a_file_without_a_config(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    strip_header_config(tmp_path / "m")
    assert PerceiverAR.from_pretrained(tmp_path / "m").config.num_latents == 16  # a legacy directory loads
    edit_config(tmp_path / "m", input_dim=64)
    with pytest.raises(ValueError, match="does not match.*has shape"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))
    edit_config(tmp_path / "m", input_dim=32, num_latent_layers=3)
    with pytest.raises(ValueError, match="missing tensors"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))


def test_shapes_and_dtypes_are_refused_before_the_weights_are_read(tmp_path):
    tiny().save_pretrained(str(tmp_path / "m"))
    strip_header_config(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(str(path))
    huge = dict(state, **{"tok_embeddings.weight": torch.zeros(1, dtype=torch.float32).expand(259, 4096)})
    save_file({k: v.contiguous() for k, v in huge.items()}, str(path))
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(259, 4096\)"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))
    save_file(dict(state, **{"output.bias": torch.zeros(259, dtype=torch.int64)}), str(path))
    with pytest.raises(ValueError, match="output.bias holds I64"):
        PerceiverAR.from_pretrained(str(tmp_path / "m"))


def test_non_finite_weights_are_never_written(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.output.bias[3] = float("nan")
    with pytest.raises(ValueError, match="not finite.*output.bias"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_save_refuses_to_overwrite_files_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(ValueError, match="did not write"):
        tiny().save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "config.json").read_text() == '{"my": "settings"}'
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["config.json"]


def test_a_training_run_directory_loads_its_published_model(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path / "run" / "model"))
    loaded = PerceiverAR.from_pretrained(str(tmp_path / "run")).eval()
    x = torch.randint(3, 259, (1, 64))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
