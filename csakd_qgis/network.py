"""The CSAKD network: CLRA blocks, the Dual Two-Streamed structure, Cross Self-Attention fusion.

Tensors are (batch, channels, rows, cols). The network is built from a plain
:class:`NetworkConfig`, which is saved beside the weights so that a bundle can be rebuilt
without code changes. The same class builds the paper's teacher and student and the
project's CPU-sized models; only the config differs.

The network never assumes a fixed scale: the low-resolution streams are resampled to the
high-resolution input's size, so one set of weights serves every resolution ratio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.2
RESIDUAL_SCALE = 0.2


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a network.

    ``blocks`` counts CLRA blocks per stream in the order (joint-HR, joint-LR, HSI, MSI).
    ``groups`` splits every CLRA convolution into groups (cheaper, as the method allows);
    ``head_groups`` does the same for the first reconstruction convolution.
    ``unshuffle`` > 1 runs the high-resolution streams on a space-to-depth view of their
    input (every f×f block of pixels becomes f² channels): the same information at 1/f² of
    the pixels and f² times the channels, which a CPU convolves far more efficiently than
    narrow full-resolution feature maps. 1 is the paper's layout.
    """

    hsi_channels: int
    msi_channels: int
    width: int
    growth: int
    blocks: Tuple[int, int, int, int]
    groups: int = 1
    head_groups: int = 1
    attention_dim: int = 64
    heads: int = 4
    scale: int = 4
    unshuffle: int = 1

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if len(self.blocks) != 4 or min(self.blocks) < 0:
            raise ValueError(f"blocks must be four non-negative counts, got {self.blocks}")
        if self.width % self.groups or self.growth % self.groups:
            raise ValueError(
                f"width ({self.width}) and growth ({self.growth}) must be divisible by groups ({self.groups})"
            )
        if self.attention_dim % self.heads:
            raise ValueError(f"attention_dim ({self.attention_dim}) must be divisible by heads ({self.heads})")
        if self.width % self.head_groups or self.hsi_channels % self.head_groups:
            raise ValueError("width and hsi_channels must be divisible by head_groups")

    def to_dict(self) -> Dict:
        data = asdict(self)
        data["blocks"] = list(self.blocks)
        return data

    @classmethod
    def from_dict(cls, data: Dict) -> "NetworkConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        return cls(**data)


def paper_teacher_config(hsi_bands: int = 172, msi_bands: int = 4) -> NetworkConfig:
    """The paper's teacher: nf = 86, gc = 43, blocks (6, 6, 4, 4)."""
    return NetworkConfig(hsi_bands, msi_bands, width=86, growth=43, blocks=(6, 6, 4, 4), head_groups=2)


def paper_student_config(hsi_bands: int = 172, msi_bands: int = 4) -> NetworkConfig:
    """The paper's student: nf = 86, gc = 43, blocks (1, 4, 4, 1)."""
    return NetworkConfig(hsi_bands, msi_bands, width=86, growth=43, blocks=(1, 4, 4, 1), head_groups=2)


def conv3x3(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode="replicate", groups=groups)


def replicate_pad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with its edge rows and columns repeated once: (N, C, H + 2, W + 2),
    what every 3×3 convolution here pads its input with."""
    return F.pad(x, (1, 1, 1, 1), mode="replicate")


class ResidualDenseUnit(nn.Module):
    """Five densely connected 3×3 convolutions; output = 0.2 · last + input."""

    def __init__(self, width: int, growth: int, groups: int = 1):
        super().__init__()
        # Unpadded: forward pads each feature once itself (the weights are those of conv3x3).
        self.convs = nn.ModuleList(
            nn.Conv2d(width + k * growth, growth if k < 4 else width, 3, groups=groups) for k in range(5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each feature is edge-padded once and kept padded: the edge padding of a concatenation
        # is the concatenation of the edge paddings, so each convolution gives exactly what its
        # own ``padding_mode="replicate"`` would, without padding the growing concatenation five
        # times (that padding took 10 % of a full-resolution student's 256² tile, torch.profiler).
        features = [replicate_pad(x)]
        for k, conv in enumerate(self.convs):
            out = conv(torch.cat(features, dim=1) if k else features[0])
            if k < 4:
                features.append(replicate_pad(F.leaky_relu(out, LEAKY_SLOPE)))
        return RESIDUAL_SCALE * out + x


class CLRABlock(nn.Module):
    """Cross-Layer Residual Aggregation: three dense units, output = 0.2 · units(x) + x."""

    def __init__(self, width: int, growth: int, groups: int = 1):
        super().__init__()
        self.units = nn.Sequential(*(ResidualDenseUnit(width, growth, groups) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RESIDUAL_SCALE * self.units(x) + x


class FeatureStream(nn.Module):
    """3×3 conv to ``width`` channels + LeakyReLU, then a stack of CLRA blocks."""

    def __init__(self, in_channels: int, width: int, growth: int, blocks: int, groups: int = 1):
        super().__init__()
        self.entry = conv3x3(in_channels, width)
        self.blocks = nn.Sequential(*(CLRABlock(width, growth, groups) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.leaky_relu(self.entry(x), LEAKY_SLOPE))


def _pixel_major(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, H·W, C): a view, without a copy, of a channels-last tensor."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, H, W) → (N, C·f², H/f, W/f) (``F.pixel_unshuffle``); ``x`` itself for f = 1, which
    pixel_unshuffle would copy."""
    return x if factor == 1 else F.pixel_unshuffle(x, factor)


def depth_to_space(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C·f², H, W) → (N, C, H·f, W·f) (``F.pixel_shuffle``); ``x`` itself for f = 1."""
    return x if factor == 1 else F.pixel_shuffle(x, factor)


class CrossSelfAttention(nn.Module):
    """Channel attention with queries, keys and values from three different streams.

    Queries and keys are L2-normalised over pixels before their dot product: an unnormalised
    dot product over all pixels grows with the tile's area, which would make a tile's output
    depend on the tile size. A learned per-head temperature replaces the fixed 1/sqrt(d/h).
    """

    def __init__(self, width: int, attention_dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.query = nn.Conv2d(width, attention_dim, 1)
        self.key = nn.Conv2d(width, attention_dim, 1)
        self.value = nn.Conv2d(width, attention_dim, 1)
        self.project = nn.Conv2d(attention_dim, width, 1)
        self.temperature = nn.Parameter(torch.full((heads, 1, 1), math.sqrt(attention_dim / heads)))
        self.gates = nn.Conv2d(4 * width, 4, 1)

    def attend(self, f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
        """(N, width, H, W) × 3 → (N, width, H, W): softmax(q̂ᵀk̂ · τ) applied to v, per head,
        with q̂, k̂ the queries and keys L2-normalised over pixels."""
        batch, _, rows, cols = f1.shape
        q, k, v = (_pixel_major(conv(f)) for conv, f in ((self.query, f1), (self.key, f2), (self.value, f3)))
        q, k, v = (x.reshape(batch, rows * cols, self.heads, -1).transpose(1, 2) for x in (q, k, v))
        # (N, heads, pixels, d). The product first, then divided by the norms (the same values
        # and gradients to float rounding): dividing every pixel's q and k along the channels-last
        # maps' pixel stride took 15 of the 34 ms of one attention on 256², 16-feature maps (a CPU,
        # two threads, torch.profiler).
        similarity = q.transpose(-2, -1) @ k  # (N, heads, d, d)
        # max(‖x‖, 1e-12) as F.normalize takes it, clamped before the root so that a channel that is
        # zero on every pixel has a zero gradient there, not the root's 0/0.
        q_norm, k_norm = (x.square().sum(dim=-2).clamp_min(1e-24).sqrt() for x in (q, k))
        similarity = similarity / (q_norm[..., :, None] * k_norm[..., None, :])
        weights = torch.softmax(similarity * self.temperature, dim=-1)  # (N, heads, d, d)
        attended = (v @ weights.transpose(-2, -1)).transpose(1, 2).reshape(batch, rows, cols, -1)
        return self.project(attended.permute(0, 3, 1, 2))

    def forward(self, f1, f2, f3, f4) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (fused feature, gate logits)."""
        attended = self.attend(f1, f2, f3) + f4
        # The 1×1 gate convolution of the four streams' concatenation, as the sum of its four
        # parts: same weights, no 4·width-channel copy (256², 16-feature channels-last maps on a
        # CPU, two threads: 18 → 3 ms).
        streams = (f1, f2, f3, attended)
        width = f1.shape[1]
        gate_logits = self.gates.bias.view(1, -1, 1, 1) + sum(
            F.conv2d(f, self.gates.weight[:, i * width : (i + 1) * width]) for i, f in enumerate(streams)
        )
        gates = torch.sigmoid(gate_logits)
        fused = (
            gates[:, 0:1] * f1 + gates[:, 1:2] * f2 + gates[:, 2:3] * f3 + gates[:, 3:4] * attended
        )
        return fused, gate_logits


class NetworkOutput(NamedTuple):
    image: torch.Tensor  # (N, hsi_channels, H, W): upsampled LR input + learned residual
    fused: torch.Tensor  # (N, width, H, W): the CSA fused feature, distilled from teacher to student


def upsample(x: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def downsample(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Anti-aliased bicubic reduction (the joint-LR stream's view of the MSI)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


class CSAKDNet(nn.Module):
    """Dual Two-Streamed network with CSA fusion and a reconstruction head.

    forward(lr_hsi (N, hsi_channels, h, w), hr_msi (N, msi_channels, H, W)) -> NetworkOutput
    with image (N, hsi_channels, H, W).
    """

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        c = config
        joint_hr, joint_lr, hsi, msi = c.blocks
        f2 = c.unshuffle**2
        self.joint_hr_stream = FeatureStream((c.hsi_channels + c.msi_channels) * f2, c.width, c.growth, joint_hr, c.groups)
        self.joint_lr_stream = FeatureStream(c.hsi_channels + c.msi_channels, c.width, c.growth, joint_lr, c.groups)
        self.hsi_stream = FeatureStream(c.hsi_channels, c.width, c.growth, hsi, c.groups)
        self.msi_stream = FeatureStream(c.msi_channels * f2, c.width, c.growth, msi, c.groups)
        self.fusion = CrossSelfAttention(c.width, c.attention_dim, c.heads)
        self.head_expand = nn.Conv2d(c.width, c.hsi_channels * f2, 3, padding=1, padding_mode="replicate", groups=c.head_groups)
        self.head_refine = conv3x3(c.hsi_channels, c.hsi_channels)

    def forward(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> NetworkOutput:
        residual, fused = self.residual(lr_hsi, hr_msi)
        return NetworkOutput(upsample(lr_hsi, tuple(hr_msi.shape[-2:]), mode="bicubic") + residual, fused)

    def residual(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(learned residual (N, hsi_channels, H, W), CSA fused feature (N, width, H/f, W/f)):
        :meth:`forward` without the bicubic LR-HSI it adds the residual to, for callers that
        would only subtract it again (two bicubic upsamplings of the tile, 8 ms of a 256² tile
        with 16 channels)."""
        f = self.config.unshuffle
        hr_size = tuple(hr_msi.shape[-2:])
        if hr_size[0] % f or hr_size[1] % f:
            raise ValueError(f"high-resolution input size {hr_size} must be a multiple of {f}")
        lr_size = tuple(lr_hsi.shape[-2:])
        work_size = (hr_size[0] // f, hr_size[1] // f)
        # On a CPU, channels-last (NHWC) activations, which the convolutions pass on to their
        # outputs (the residual and fused feature come out channels-last): oneDNN convolves
        # narrow feature maps (4–48 channels in the full-resolution student) far faster so. A
        # full-resolution student's 256² tile, two threads, with the dense units' single padding:
        # 0.67–0.72 → 0.30–0.34 s; the bundled student 0.23 → 0.17–0.18 s (make bench's cost
        # section, old and new code alternating). Not on a GPU, where it is unmeasured here and
        # cuDNN's NHWC kernels for grouped convolutions can be slower.
        if lr_hsi.device.type == "cpu":
            lr_hsi, hr_msi = (t.contiguous(memory_format=torch.channels_last) for t in (lr_hsi, hr_msi))
        hsi_up = upsample(lr_hsi, hr_size)
        f_joint_hr = self.joint_hr_stream(space_to_depth(torch.cat([hsi_up, hr_msi], dim=1), f))
        f_joint_lr = upsample(self.joint_lr_stream(torch.cat([lr_hsi, downsample(hr_msi, lr_size)], dim=1)), work_size)
        f_msi = self.msi_stream(space_to_depth(hr_msi, f))
        f_hsi = upsample(self.hsi_stream(lr_hsi), work_size)
        # Joint features ask, distinct features answer: Q from joint-HR, K from joint-LR, V from MSI,
        # and the HSI stream is the attention's residual.
        fused, _ = self.fusion(f_joint_hr, f_joint_lr, f_msi, f_hsi)
        expanded = depth_to_space(F.leaky_relu(self.head_expand(fused), LEAKY_SLOPE), f)
        return self.head_refine(expanded), fused


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, lr_shape: Tuple[int, ...], hr_shape: Tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass, counted from the layers actually run.

    Convolutions are counted from their output size; the attention's two matrix products and its
    gate convolution (applied through its weight's slices, so no module hook sees it) are added
    explicitly. Interpolations and element-wise operations are not counted, as is usual.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() * kernel

    def attention_hook(module: CrossSelfAttention, inputs, _output):
        nonlocal total
        batch, _, rows, cols = inputs[0].shape
        per_head = module.query.out_channels // module.heads
        total += 2 * batch * module.heads * per_head * per_head * rows * cols
        # The gates' 1×1 convolution, which forward applies through its weight's slices.
        total += batch * rows * cols * module.gates.in_channels * module.gates.out_channels

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(attention_hook) for m in model.modules() if isinstance(m, CrossSelfAttention)]
    try:
        with torch.no_grad():
            model(torch.zeros(lr_shape), torch.zeros(hr_shape))
    finally:
        for h in handles:
            h.remove()
    return total
