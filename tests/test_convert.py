"""The official converter refuses what it cannot represent."""

import json

import numpy as np
import pytest

from perceiver_ar import from_official
from perceiver_ar.convert import load_official_npz, read_official_config
from tests.conftest import GOLDEN_DIR

NPZ = GOLDEN_DIR / "golden_A_rotary.npz"


def official():
    kwargs = read_official_config(NPZ)
    for k in ("param_seed", "z_loss", "label_smoothing"):
        kwargs.pop(k)
    return load_official_npz(NPZ), kwargs


@pytest.mark.parametrize(
    "option, value",
    [
        ("num_latents_per_position", 2),
        ("initial_query_embed_style", "mlp"),
        ("additional_cross_attend_after_layers", [0]),
        ("use_positions_from_data", False),
        ("cross_attention_shape_for_attn", "q"),
        ("fraction_heads_to_rotate", 0.5),
        ("train_input_positions", 32),
    ],
)
def test_unsupported_official_options_are_errors(option, value):
    params, kwargs = official()
    kwargs[option] = value
    with pytest.raises(ValueError, match=f"{option}=.* is not supported"):
        from_official(params, kwargs)


def test_unknown_option_path_and_shape_errors():
    params, kwargs = official()
    with pytest.raises(ValueError, match="unknown official PerceiverAR options"):
        from_official(params, {**kwargs, "frobnicate": 1})
    extra = {**params, "perceiver_ar/~/extra/w": np.zeros(3)}
    with pytest.raises(ValueError, match="unknown paths"):
        from_official(extra, kwargs)
    missing = dict(params)
    del missing["perceiver_ar/~/logits/w"]
    with pytest.raises(ValueError, match="missing paths"):
        from_official(missing, kwargs)
    bad = {**params, "perceiver_ar/~/logits/w": np.zeros((32, 100), np.float32)}
    with pytest.raises(ValueError, match="perceiver_ar/~/logits/w has shape"):
        from_official(bad, kwargs)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    from perceiver_ar.cli import main

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(official()[1]))
    assert main(["convert-official", str(tmp_path / "missing.npz"), str(cfg), str(tmp_path / "o")]) == 2
    assert "missing.npz" in capsys.readouterr().err
    empty = tmp_path / "empty.npz"
    np.savez(empty, a=np.zeros(2))
    assert main(["convert-official", str(empty), str(cfg), str(tmp_path / "o")]) == 2
    assert "holds no official parameters" in capsys.readouterr().err
