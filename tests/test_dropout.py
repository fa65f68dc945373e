"""Cross-attend dropout: train-time only, never a latent with every input hidden."""

import pytest
import torch

from perceiver_ar import PerceiverAR, PerceiverARConfig, perceiver_ar_loss
from perceiver_ar.attention import Masks, sequence_lengths
from perceiver_ar.model import drop_prefix_inputs


def model_with(**kw):
    torch.manual_seed(0)
    cfg = PerceiverARConfig(
        context_len=48,
        num_latents=8,
        input_dim=16,
        latent_dim=16,
        num_latent_layers=1,
        cross_attend_heads=2,
        latent_heads=2,
        final_layer_init_zeros=False,
        **kw,
    )
    return PerceiverAR(cfg)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 259, (4, 48), generator=g)
    for b, n in enumerate([48, 30, 9, 3]):
        x[b, n:] = 0
    return x


def captured_masks(model, x):
    seen = []

    def hook(module, args):
        seen.extend(a for a in args if isinstance(a, Masks))

    h = model.cross_attend.register_forward_pre_hook(hook)
    model(x)
    h.remove()
    return seen[0]


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.99])
def test_mask_form_never_hides_every_input_from_a_latent(rate):
    model = model_with(cross_attend_dropout=rate).train()
    for seed in range(20):
        torch.manual_seed(seed)
        x = batch(seed)
        masks = captured_masks(model, x)
        cross = masks.cross.dense(48)[:, 0]  # [B, M, T]
        out = model(x)
        li = out.latent_index
        valid = li >= 0
        assert cross.any(dim=-1)[valid].all()
        # A latent always sees its own input, and never a later one.
        b, m = valid.nonzero(as_tuple=True)
        assert cross[b, m, li[b, m]].all()
        later = torch.arange(48)[None, None, :] > li[:, :, None]
        assert not (cross & later & valid[:, :, None]).any()
        assert torch.isfinite(out.logits).all()
    # The rate is real: about `rate` of the visible prefix is hidden.
    full_row_visible = cross[0, 0, :40].float().mean().item()
    assert abs(full_row_visible - (1 - rate)) < 0.35


@pytest.mark.parametrize("mode", ["mask", "drop"])
def test_dropout_is_train_time_only(mode):
    x = batch()
    plain = model_with().eval()
    dropped = model_with(cross_attend_dropout=0.7, cross_attend_dropout_mode=mode, latent_dropout=0.3)
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x).logits, plain(x).logits)
        torch.manual_seed(1)
        train_logits = dropped.train()(x).logits
    assert not torch.allclose(train_logits, plain(x).logits)


def test_drop_form_keeps_latent_inputs_and_order():
    x = batch()
    B, T = x.shape
    emb = torch.randn(B, T, 4)
    pos = torch.arange(1, T + 1).expand(B, T) * (x != 0)
    for seed in range(10):
        torch.manual_seed(seed)
        xs, es, ps, kept = drop_prefix_inputs(x, emb, pos, num_latents=8, rate=0.5)
        assert xs.shape[1] == 8 + round(0.5 * 40)
        assert (kept.diff(dim=1) > 0).all()  # order kept
        assert torch.equal(xs, x.gather(1, kept)) and torch.equal(
            es, emb.gather(1, kept[..., None].expand(-1, -1, 4))
        )
        lengths = sequence_lengths(x)
        for b in range(B):
            n = int(lengths[b])
            row_kept = set(kept[b].tolist())
            assert set(range(max(n - 8, 0), n)) <= row_kept  # the latent inputs survive
            valid = xs[b] != 0
            assert not (valid[1:] & ~valid[:-1]).any()  # still right-padded
        assert torch.equal(sequence_lengths(xs)[2:], lengths[2:])  # short rows lose nothing


def test_drop_form_reports_latents_in_caller_coordinates_and_trains():
    model = model_with(cross_attend_dropout=0.5, cross_attend_dropout_mode="drop").train()
    x = batch()
    out = model(x)
    lengths = sequence_lengths(x)
    for b in range(4):
        n = int(lengths[b])
        expect = [i if i >= 0 else -1 for i in range(n - 8, n)]
        assert out.latent_index[b].tolist() == expect
    targets = torch.cat([x[:, 1:], torch.zeros(4, 1, dtype=torch.long)], dim=1)
    loss = perceiver_ar_loss(out.logits, targets, out.latent_index)
    loss.mean.backward()
    assert model.tok_embeddings.weight.grad is not None and torch.isfinite(loss.mean)
