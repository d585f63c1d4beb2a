"""The synthesis models: MMgSN-Net as seed 000 describes it, its discriminator, ablations and
the baselines, checked by shape, parameter count and gradient flow."""

from __future__ import annotations

import pytest
import torch

from synthesis.models import MODELS, MMgSNNet, PatchGAN, build, parameter_count
from synthesis.models.blocks import Concatenation, SelfAttention, SynergisticGuidance

H, W = 256, 224


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_mmgsn_maps_256x224_to_256x224():
    model = MMgSNNet().eval()
    with torch.inference_mode():
        y = model(torch.randn(1, 2, H, W))
    assert y.shape == (1, 1, H, W)
    assert y.abs().max() <= 1.0  # tanh output for targets in [-1, 1]


def test_patchgan_gives_16x14_patches_for_256x224():
    d = PatchGAN().eval()
    with torch.inference_mode():
        scores = d(torch.randn(2, 1, H, W), torch.randn(2, 2, H, W))
    assert scores.shape == (2, 1, 16, 14)
    with pytest.raises(ValueError, match="conditional"):
        d(torch.randn(1, 1, H, W))
    assert PatchGAN(conditional=False)(torch.randn(1, 1, H, W)).shape == (1, 1, 16, 14)


def test_patchgan_follows_the_seed():
    d = PatchGAN()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [c.stride for c in convs[:4]] == [(2, 2)] * 4
    assert all(c.padding == (1, 1) for c in convs[:4])
    norms = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(n.momentum == pytest.approx(0.2) for n in norms)  # Keras 0.8


def test_parameter_counts():
    counts = {name: parameter_count(build(name)) for name in MODELS}
    # Reported figures (README): the full MMgSN-Net and the small CPU variant.
    assert 7.5e6 < counts["mmgsn"] < 9e6
    small = parameter_count(MMgSNNet(width_multiplier=0.25))
    assert small < counts["mmgsn"] / 10
    assert counts["patchgan"] > 1e6


def _gradient_from(model: MMgSNNet, x: torch.Tensor) -> torch.Tensor:
    captured = {}

    def keep_input(module, inputs, output):
        captured["in"] = inputs[0]

    model.block2[0].register_forward_hook(keep_input)
    model(x)
    (grad,) = torch.autograd.grad(captured["in"].sum(), x)
    return grad


def test_sgs_feeds_the_t2w_into_the_t1w_branch():
    # Branch a (T1w) block 2 sees the T2w through SGS1's feedback: the gradient of its input
    # with respect to the T2w channel is not zero.
    model = MMgSNNet(width_multiplier=0.125)
    x = torch.randn(1, 2, 64, 56, requires_grad=True)
    grad = _gradient_from(model, x)
    assert grad[:, 1].abs().sum() > 0
    assert grad[:, 0].abs().sum() > 0


def test_concatenation_ablation_also_feeds_back_but_does_not_select():
    model = MMgSNNet(width_multiplier=0.125, fusion="concat")
    assert isinstance(model.sgs1, Concatenation)
    x = torch.randn(1, 2, 64, 56, requires_grad=True)
    assert _gradient_from(model, x)[:, 1].abs().sum() > 0


def test_gradients_reach_both_branches_and_every_parameter():
    model = MMgSNNet(width_multiplier=0.125)
    x = torch.randn(2, 2, 64, 56)
    model(x).square().mean().backward()
    for branch in (0, 1):
        for block in (model.block1, model.block2, model.block3):
            grads = [p.grad for p in block[branch].parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_ablation_switches_change_the_graph():
    full = MMgSNNet(width_multiplier=0.25)
    no_sgs = MMgSNNet(width_multiplier=0.25, fusion="concat")
    no_ml = MMgSNNet(width_multiplier=0.25, multi_level=False)
    no_att = MMgSNNet(width_multiplier=0.25, attention=False)
    assert isinstance(full.sgs1, SynergisticGuidance) and isinstance(full.attention, SelfAttention)
    assert isinstance(no_att.attention, torch.nn.Identity)
    assert no_ml.head.in_channels < full.head.in_channels
    counts = {parameter_count(m) for m in (full, no_sgs, no_ml, no_att)}
    assert len(counts) == 4
    x = torch.randn(1, 2, 64, 56)
    for model in (no_sgs, no_ml, no_att):
        assert model.eval()(x).shape == (1, 1, 64, 56)


def test_attention_starts_as_identity_and_learns_a_scale():
    attention = SelfAttention(16)
    x = torch.randn(2, 16, 32, 28)
    assert torch.equal(attention(x), x)
    assert attention.gamma.requires_grad


def test_exact_sagan_attention_matches_a_hand_computation():
    attention = SelfAttention(16, pool=1)
    with torch.no_grad():
        attention.gamma.fill_(0.7)
    x = torch.randn(1, 16, 6, 5)
    q = attention.query(x).flatten(2)  # (1, 2, 30)
    k = attention.key(x).flatten(2)
    v = attention.value(x).flatten(2)  # (1, 16, 30)
    weights = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (1, 30, 30), unscaled
    expected = x + 0.7 * (v @ weights.transpose(1, 2)).reshape(1, 16, 6, 5)
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


def test_pooled_attention_in_inference_mode_and_its_gradients_match_the_unfused_form():
    """The padded one-head form (fused kernels) equals softmax(q^T k) v with pooled keys and
    values, in inference mode (the node) and in its gradients (training)."""
    attention = SelfAttention(32, pool=4)
    with torch.no_grad():
        attention.gamma.fill_(0.5)
    x = torch.randn(2, 32, 32, 28, requires_grad=True)

    def unfused(x: torch.Tensor) -> torch.Tensor:
        source = torch.nn.functional.max_pool2d(x, 4)
        q = attention.query(x).flatten(2)  # (2, 4, 896)
        k, v = attention.key(source).flatten(2), attention.value(source).flatten(2)
        weights = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (2, 896, 56)
        return x + attention.gamma * (v @ weights.transpose(1, 2)).reshape(x.shape)

    with torch.inference_mode():
        torch.testing.assert_close(attention(x.detach()), unfused(x.detach()))
    (attention(x) ** 2).sum().backward()
    fused_grad, x.grad = x.grad, None
    (unfused(x) ** 2).sum().backward()
    torch.testing.assert_close(fused_grad, x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "config"),
    [("unet", {"inputs": ("t1w",)}), ("unet", {"inputs": ("t2w",)}), ("unet", {}),
     ("hinet", {}), ("pix2pix", {}), ("cyclegan", {"inputs": ("t1w",)}),
     ("cyclegan", {"inputs": ("t2w",)})],
)
def test_baselines_map_their_inputs_to_one_image(name, config):
    model = build(name, width_multiplier=0.125, **config).eval()
    with torch.inference_mode():
        y = model(torch.randn(1, len(model.inputs), H, W))
    assert y.shape == (1, 1, H, W)


def test_hinet_reconstructs_its_inputs():
    model = build("hinet", width_multiplier=0.125).eval()
    with torch.inference_mode():
        r1, r2 = model.reconstruct(torch.randn(1, 2, 64, 56))
    assert r1.shape == r2.shape == (1, 1, 64, 56)


def test_important_net_maps_any_non_empty_subset_of_its_inputs():
    """Seed 003: one network for whatever sequences were acquired. An absent input takes no
    part (its values do not change the output)."""
    torch.manual_seed(0)
    model = build("important", inputs=("t1w", "t2w", "dwi"), width_multiplier=0.125).eval()
    x = torch.randn(2, 3, 64, 48)
    other = x.clone()
    other[:, 1] = 100.0  # the T2w, absent below
    with torch.inference_mode():
        for present in ([True, True, True], [True, False, False], [False, True, True]):
            assert model(x, present=present).shape == (2, 1, 64, 48)
        only = [True, False, True]
        torch.testing.assert_close(model(x, present=only), model(other, present=only))
        assert not torch.allclose(model(x), model(other))
        out = model(x, reconstruct=True, present=only)  # training: every input reconstructed
        assert [r.shape for r in out[1:]] == [(2, 1, 64, 48)] * 3
        torch.testing.assert_close(out[0], model(x, present=only))
        with pytest.raises(ValueError, match="at least one"):
            model(x, present=[False, False, False])


def test_important_net_maps_strategy_and_gradients():
    from synthesis.models.important import maps

    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    maximum, average, product, difference = maps([a, b])
    for got, expected in ((maximum, [[3.0, 1.0]]), (average, [[2.0, -0.5]]),
                          (product, [[3.0, -2.0]]), (difference, [[2.0, 3.0]])):
        torch.testing.assert_close(got, torch.tensor(expected))
    model = build("important", width_multiplier=0.125)
    out = model(torch.randn(2, 2, 32, 32), reconstruct=True)
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter learns
    assert model.reconstruction_weight == 25.0  # seed 003's lambda_2
    # seed 003's filters (64-512, bottom 1024 and 512): 101 M parameters for two inputs
    assert 1.0e8 < parameter_count(build("important")) < 1.02e8


def test_registry_rebuilds_from_config():
    model = build("mmgsn", width_multiplier=0.25, attention=False)
    again = build("mmgsn", **model.config)
    assert parameter_count(again) == parameter_count(model)
    with pytest.raises(KeyError, match="unknown model 'vnet'"):
        build("vnet")
