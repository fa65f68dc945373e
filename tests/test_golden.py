"""Golden agreement with the official JAX implementation (its reference outputs are in tests/golden/)."""

import json

import numpy as np
import pytest
import torch

from perceiver_ar import from_official, perceiver_ar_loss
from perceiver_ar.convert import load_official_npz, read_official_config
from tests.conftest import GOLDEN_DIR

CONFIGS = ["A_rotary", "B_absolute_random", "C_rotary_E48_D32", "D_absolute_sinusoidal"]
CASES = ["full", "padded", "short", "edge"]
NON_MODEL_KEYS = ("param_seed", "z_loss", "label_smoothing")


def _load(name):
    path = GOLDEN_DIR / f"golden_{name}.npz"
    data = np.load(path, allow_pickle=False)
    kwargs = json.loads(str(data["config_json"]))
    kwargs = {k: v for k, v in kwargs.items() if k not in NON_MODEL_KEYS}
    params = {k.removeprefix("params/"): data[k] for k in data.files if k.startswith("params/")}
    return from_official(params, kwargs).eval(), data


@pytest.mark.parametrize("name", CONFIGS)
def test_golden_logits_and_loss(name):
    model, data = _load(name)
    for case in CASES:
        inputs = torch.from_numpy(data[f"{case}/inputs"]).long()
        positions = torch.from_numpy(data[f"{case}/input_idxs"][..., 0]).long()
        with torch.no_grad():
            out = model(inputs, positions)
        np.testing.assert_array_equal(out.latent_index.numpy(), data[f"{case}/latent_last_steps"])
        ref = data[f"{case}/logits"]
        valid = data[f"{case}/latent_valid"].astype(bool)
        diff = np.abs(out.logits.numpy() - ref)
        assert diff[valid].max() < 1e-4, f"{name}/{case}: valid latents differ by {diff[valid].max()}"
        # Invalid latents are defined too (uniform cross-attention over all inputs).
        assert diff.max() < 1e-4, f"{name}/{case}: invalid latents differ by {diff.max()}"

        targets = torch.from_numpy(data[f"{case}/targets"]).long()
        loss = perceiver_ar_loss(out.logits, targets, out.latent_index, z_loss=1e-4)
        total = float(data[f"{case}/total_loss"])
        assert abs(float(loss.total) - total) <= 1e-4 * abs(total), (name, case, float(loss.total), total)
        z_total = float(data[f"{case}/total_z_loss"])
        assert abs(float(loss.total_z_loss) - z_total) <= 1e-4 * abs(z_total) + 1e-6
        np.testing.assert_array_equal(loss.mask.numpy(), data[f"{case}/loss_mask"].astype(bool))
        np.testing.assert_allclose(loss.per_latent.numpy(), data[f"{case}/loss"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["A_rotary", "C_rotary_E48_D32"])
def test_golden_intermediate_activations(name):
    """Layer-by-layer agreement, so a regression points at the layer that broke."""
    model, data = _load(name)
    inputs = torch.from_numpy(data["padded/inputs"]).long()
    positions = torch.from_numpy(data["padded/input_idxs"][..., 0]).long()
    captured = {}
    hooks = [
        model.latent_init.register_forward_hook(lambda m, i, o: captured.__setitem__("linear:out", o)),
        model.cross_attend.register_forward_hook(
            lambda m, i, o: captured.__setitem__("cross_attention:out", o)
        ),
        model.latent_layers[0].register_forward_hook(
            lambda m, i, o: captured.__setitem__("self_attention:out", o)
        ),
        model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("logits:in", o)),
    ]
    with torch.no_grad():
        model(inputs, positions)
    for h in hooks:
        h.remove()
    keys = {
        "linear:out": "padded/act/perceiver_ar/~/linear:out",
        "cross_attention:out": "padded/act/perceiver_ar/~/cross_attention:out",
        "self_attention:out": "padded/act/perceiver_ar/~/self_attention:out",
        "logits:in": "padded/act/perceiver_ar/~/logits:in",
    }
    for ours, theirs in keys.items():
        np.testing.assert_allclose(captured[ours].numpy(), data[theirs], atol=1e-4, err_msg=ours)


def test_convert_from_npz_files_and_cli(tmp_path):
    from perceiver_ar import PerceiverAR
    from perceiver_ar.cli import main

    npz = GOLDEN_DIR / "golden_B_absolute_random.npz"
    cfg_path = tmp_path / "config.json"
    kwargs = read_official_config(npz)
    cfg_path.write_text(json.dumps({k: v for k, v in kwargs.items() if k not in NON_MODEL_KEYS}))
    assert main(["convert-official", str(npz), str(cfg_path), str(tmp_path / "model")]) == 0
    model = PerceiverAR.from_pretrained(str(tmp_path / "model"))
    data = np.load(npz)
    with torch.no_grad():
        out = model(
            torch.from_numpy(data["full/inputs"]).long(), torch.from_numpy(data["full/input_idxs"][..., 0])
        )
    np.testing.assert_allclose(out.logits.numpy(), data["full/logits"], atol=1e-4)
    assert len(load_official_npz(npz)) == len(model.state_dict())


@pytest.mark.parametrize("case", CASES)
def test_shift_events_matches_the_official_inputs_and_targets(case):
    from perceiver_ar import shift_events

    data = np.load(GOLDEN_DIR / "golden_A_rotary.npz")
    inputs, targets = shift_events(torch.from_numpy(data[f"{case}/events"]).long())
    np.testing.assert_array_equal(inputs.numpy(), data[f"{case}/inputs"])
    np.testing.assert_array_equal(targets.numpy(), data[f"{case}/targets"])
