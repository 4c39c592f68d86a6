import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from csakd_qgis.network import (
    CLRABlock,
    LEAKY_SLOPE,
    RESIDUAL_SCALE,
    CrossSelfAttention,
    CSAKDNet,
    NetworkConfig,
    ResidualDenseUnit,
    count_macs,
    count_parameters,
    paper_teacher_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The paper's table (method.md): teacher 26.8 M parameters, 942 G MACs per 256×256 output.
PAPER_TEACHER_PARAMETERS = 26.8e6
PAPER_TEACHER_MACS = 942e9


def small_config(**changes):
    values = dict(hsi_channels=6, msi_channels=3, width=8, growth=4, blocks=(1, 1, 1, 1), attention_dim=8, heads=2)
    values.update(changes)
    return NetworkConfig(**values)


def test_paper_teacher_matches_published_size_and_cost():
    # The meta device runs the forward pass on shapes only: the real 256×256 tile would
    # cost ~10 s of CPU for numbers that depend on shapes alone.
    with torch.device("meta"):
        teacher = CSAKDNet(paper_teacher_config(hsi_bands=172, msi_bands=4))
        parameters = count_parameters(teacher)
        macs = count_macs(teacher, (1, 172, 64, 64), (1, 4, 256, 256))
    assert abs(parameters - PAPER_TEACHER_PARAMETERS) <= 0.01 * PAPER_TEACHER_PARAMETERS, parameters
    assert abs(macs - PAPER_TEACHER_MACS) <= 0.01 * PAPER_TEACHER_MACS, macs


def test_dense_unit_has_five_densely_connected_convs():
    nf, gc = 10, 4
    unit = ResidualDenseUnit(nf, gc)
    assert [c.in_channels for c in unit.convs] == [nf, nf + gc, nf + 2 * gc, nf + 3 * gc, nf + 4 * gc]
    assert [c.out_channels for c in unit.convs] == [gc, gc, gc, gc, nf]
    assert all(c.kernel_size == (3, 3) for c in unit.convs)


def test_dense_unit_pads_each_feature_once_as_each_convolution_would():
    # The unit edge-pads every feature once and keeps it padded; its output must be that of
    # five edge-padded 3×3 convolutions on the growing concatenation, in either memory layout.
    torch.manual_seed(3)
    unit = ResidualDenseUnit(8, 4, groups=2)
    x = torch.randn(2, 8, 11, 17)
    features = [x]
    for k, conv in enumerate(unit.convs):
        out = F.conv2d(F.pad(torch.cat(features, dim=1), (1, 1, 1, 1), mode="replicate"), conv.weight, conv.bias, groups=2)
        if k < 4:
            features.append(F.leaky_relu(out, LEAKY_SLOPE))
    expected = RESIDUAL_SCALE * out + x
    with torch.no_grad():
        assert torch.allclose(unit(x), expected, atol=1e-5)
        assert torch.allclose(unit(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)


def _zero_convs(module: nn.Module, last_bias: float = 0.0):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ResidualDenseUnit):
                for conv in m.convs:
                    conv.weight.zero_()
                    conv.bias.zero_()
                m.convs[-1].bias.fill_(last_bias)


def test_dense_unit_residual_scaling():
    x = torch.randn(2, 10, 5, 7)
    unit = ResidualDenseUnit(10, 4)
    _zero_convs(unit)
    torch.testing.assert_close(unit(x), x, rtol=0, atol=0)
    # Only the last conv's bias b = 1 left: output = 0.2·b + x.
    _zero_convs(unit, last_bias=1.0)
    torch.testing.assert_close(unit(x), x + 0.2, rtol=0, atol=1e-6)


def test_clra_block_residual_scaling():
    # Block output = 0.2·units(x) + x (method.md, ESRGAN's RRDB). With every conv zeroed
    # each unit is the identity, so units(x) = x and the block gives 1.2·x, not x.
    x = torch.randn(2, 10, 5, 7)
    block = CLRABlock(10, 4)
    _zero_convs(block)
    torch.testing.assert_close(block(x), 1.2 * x, rtol=1e-6, atol=1e-6)
    # With last bias b in every unit: each unit adds 0.2·b, three units give x + 0.6·b,
    # the block 0.2·(x + 0.6·b) + x = 1.2·x + 0.12·b.
    _zero_convs(block, last_bias=1.0)
    torch.testing.assert_close(block(x), 1.2 * x + 0.12, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_forward_shapes_for_every_scale(scale):
    torch.manual_seed(0)
    net = CSAKDNet(small_config()).eval()
    lr = torch.randn(2, 6, 5, 4)
    hr = torch.randn(2, 3, 5 * scale, 4 * scale)
    with torch.no_grad():
        out = net(lr, hr)
    assert out.image.shape == (2, 6, 5 * scale, 4 * scale)
    assert out.fused.shape == (2, 8, 5 * scale, 4 * scale)
    assert torch.isfinite(out.image).all()


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_unshuffle_forward_shapes(scale):
    torch.manual_seed(0)
    net = CSAKDNet(small_config(unshuffle=2)).eval()
    lr = torch.randn(1, 6, 4, 6)
    with torch.no_grad():
        out = net(lr, torch.randn(1, 3, 4 * scale, 6 * scale))
    assert out.image.shape == (1, 6, 4 * scale, 6 * scale)
    # The fused feature lives on the space-to-depth grid.
    assert out.fused.shape == (1, 8, 2 * scale, 3 * scale)


def test_unshuffle_rejects_hr_size_not_a_multiple():
    net = CSAKDNet(small_config(unshuffle=2)).eval()
    # 5 × 3 = 15 rows cannot be cut into 2×2 blocks.
    with pytest.raises(ValueError, match="multiple of 2"):
        net(torch.randn(1, 6, 5, 6), torch.randn(1, 3, 15, 18))


class _OneInput(nn.Module):
    """Lets count_macs, which calls model(lr, hr), drive a single layer on the HR input."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, _lr, hr):
        return self.layer(hr)


@pytest.mark.parametrize(
    "conv,hr_shape,expected",
    [
        # 5 output channels × 8×8 pixels, each 3·3·3 = 27 MACs: 320 · 27 = 8640.
        (nn.Conv2d(3, 5, 3, padding=1), (1, 3, 8, 8), 8640),
        # Two groups: each output sees 4/2 = 2 input channels, 3·3·2 = 18 MACs; 6·8·8 = 384 outputs: 6912.
        (nn.Conv2d(4, 6, 3, padding=1, groups=2), (1, 4, 8, 8), 6912),
        # Stride 2 halves the output to 4×4: 5·16 = 80 outputs · 27 = 2160; batch 2 doubles it: 4320.
        (nn.Conv2d(3, 5, 3, padding=1, stride=2), (2, 3, 8, 8), 4320),
    ],
)
def test_count_macs_of_a_single_conv(conv, hr_shape, expected):
    assert count_macs(_OneInput(conv), (1, 1, 1, 1), hr_shape) == expected


def test_count_macs_of_cross_self_attention():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = CrossSelfAttention(width=8, attention_dim=8, heads=2)

        def forward(self, _lr, hr):
            return self.attention(hr, hr, hr, hr)

    # Per pixel P: q, k, v and the projection are 8→8 1×1 convs (4·64), the gates 32→4 (128),
    # the two channel products 2 · heads 2 · (8/2)² = 64. Total 448 per pixel; 6×5 = 30 pixels.
    assert count_macs(Wrapper(), (1, 1, 1, 1), (1, 8, 6, 5)) == 448 * 30


def test_cross_self_attention_matches_its_definition():
    # forward normalises after the product and applies the gate convolution through its weight's
    # slices; both must give the definition's values and gradients: q, k L2-normalised over
    # pixels (F.normalize), the softmax of their channel products per head applied to v, and a
    # 1×1 convolution of the four streams' concatenation for the gates. In either memory layout,
    # with more features than the attention has channels.
    torch.manual_seed(5)
    attention = CrossSelfAttention(width=12, attention_dim=8, heads=2).double()
    with torch.no_grad():
        attention.temperature.copy_(torch.tensor([[[1.7]], [[0.6]]]))

    def definition(f1, f2, f3, f4):
        def heads(t):
            return t.reshape(2, 2, 4, 63)

        q = F.normalize(heads(attention.query(f1)), dim=-1)
        k = F.normalize(heads(attention.key(f2)), dim=-1)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * attention.temperature, dim=-1)
        attended = attention.project((weights @ heads(attention.value(f3))).reshape(2, 8, 7, 9)) + f4
        logits = attention.gates(torch.cat([f1, f2, f3, attended], dim=1))
        g = torch.sigmoid(logits)
        return g[:, 0:1] * f1 + g[:, 1:2] * f2 + g[:, 2:3] * f3 + g[:, 3:4] * attended, logits

    streams = [torch.randn(2, 12, 7, 9, dtype=torch.float64) for _ in range(4)]
    expected = definition(*streams)
    expected_grads = torch.autograd.grad(expected[0].square().sum() + expected[1].sum(), list(attention.parameters()))
    for layout in (torch.contiguous_format, torch.channels_last):
        got = attention(*(f.contiguous(memory_format=layout) for f in streams))
        for value, reference in zip(got, expected):
            torch.testing.assert_close(value, reference)
        grads = torch.autograd.grad(got[0].square().sum() + got[1].sum(), list(attention.parameters()))
        for grad, reference in zip(grads, expected_grads):
            torch.testing.assert_close(grad, reference)
    # A query channel that is zero on every pixel (its weights and bias zero): F.normalize's
    # gradient there is finite, and so must forward's be.
    with torch.no_grad():
        attention.query.weight[0].zero_()
        attention.query.bias[0] = 0.0
    fused, _ = attention(*streams)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(fused.sum(), list(attention.parameters())))


def test_config_round_trip_through_json():
    config = small_config(groups=2, head_groups=2, unshuffle=4, scale=3)
    data = json.loads(json.dumps(config.to_dict()))
    assert NetworkConfig.from_dict(data) == config
    assert NetworkConfig.from_dict(data).blocks == (1, 1, 1, 1)


def test_config_rejects_unknown_keys():
    data = small_config().to_dict()
    data["depth"] = 3
    with pytest.raises(ValueError, match="depth"):
        NetworkConfig.from_dict(data)


@pytest.mark.parametrize(
    "changes",
    [
        dict(width=10, growth=5, groups=2),  # growth 5 not divisible by 2 groups
        dict(width=9, growth=6, groups=2),  # width 9 not divisible by 2 groups
        dict(head_groups=4),  # hsi_channels 6 not divisible by 4
        dict(attention_dim=10, heads=4),
        dict(blocks=(1, 1, 1)),
        dict(blocks=(1, -1, 1, 1)),
    ],
)
def test_config_rejects_invalid_values(changes):
    with pytest.raises(ValueError):
        small_config(**changes)
