"""RunicNet: an attention CNN for Pap-smear cell classification, registered as ``runicnet``.

Source: E. B. Bjørkeli and M. Esmaeili, "RunicNet: Leveraging CNNs With Attention Mechanisms for
Cervical Cancer Cell Classification", *Biomedical Engineering and Computational Biology* (2025),
doi:10.1177/11795972251351815. Only the paper's description was available to us, not its code, so this
is a re-implementation from that description plus the papers its building blocks come from.

**Taken from the paper:** a CNN built from high-frequency attention blocks (HFAB) that enhance residual
blocks (ERB), pixel attention (PA) for efficiency, a gated-dconv feed-forward network (GDFN) to refine
the representation, then global average pooling, dropout and a dense classifier; 196×196 px inputs.

**Our interpretation** (block internals, widths and depths are ours):

* Every 3×3 convolution is a :class:`RepConv3x3`: at training time it sums 3×3+BN, 1×1+BN and
  identity-BN branches (RepVGG, Ding et al. 2021) and, optionally, fixed Sobel-x/Sobel-y/Laplacian
  filters each followed by a learnable 1×1+BN (the edge branches of ECB, Zhang et al. ACM MM 2021,
  reordered filter-then-1×1 so that the fusion is exact at the borders). :meth:`RunicNet.reparameterize`
  folds all branches into one 3×3 convolution with bias; eval-mode outputs do not change.
* ERB (FMEN, Du et al. 2022, arXiv:2204.08397): ``rep3×3 → LeakyReLU → PA → rep3×3 → LeakyReLU``; the
  identity branches of the re-parameterizable convolutions make it a residual block with no extra skip
  at inference time. PA (PAN, Zhao et al. 2020, arXiv:2010.01073) is ``x · σ(conv1×1(x))``, a 3-D map.
* HFAB: FMEN's attention branch (squeeze → ERB → excite, BN inside, → sigmoid), applied to a high-pass
  ``h = x − avgpool3×3(x)`` (chromatin texture, nuclear borders): ``y = x + σ(A(h)) · h``, a learned,
  per-pixel unsharp mask.
* GDFN (Restormer, Zamir et al. CVPR 2022): ``LayerNorm → 1×1 expand → depthwise 3×3 → GELU(a)·b → 1×1``
  with a shortcut. Between stages the depthwise convolution has stride 2, so the GDFN is also the
  down-sampling transition (shortcut: 2×2 average pool + 1×1 conv + BN); after the last stage it refines
  at stride 1.
* Stem: two stride-2 re-parameterizable 3×3 convolutions (so 224 px → 56 px); four stages at strides 4,
  8, 16, 32 of blocks ``ERB → HFAB``; then BN, LeakyReLU, global average pooling, dropout and a linear
  head. Any input of at least 32×32 px works (we feed 224×224 crops).

Variants (``num_classes=5``, ``in_chans=3``, 224×224 input; MACs of the convolutions and the head,
measured with ``torch.utils.flop_counter``; "train" before, "deploy" after :meth:`RunicNet.reparameterize`)::

                   widths           depths    params train / deploy   GMACs train / deploy
    runicnet       32-64-128-256    2-2-3-1   5.07 M / 3.72 M         1.05 / 0.73
    runicnet-tiny  16-32-64-128     1-1-2-1   1.09 M / 0.81 M         0.19 / 0.13

``in_chans=4`` takes RGB plus a nucleus-mask channel ("segmentation-informed classification"); the
extra channel simply widens the stem. No pretrained weights exist: ``pretrained=True`` is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from wsi_screen.errors import BundleError
from wsi_screen.models.registry import register_architecture

__all__ = [
    "ERB",
    "HFAB",
    "RUNICNET_VARIANTS",
    "GDFNTransition",
    "PixelAttention",
    "RepConv3x3",
    "RunicBlock",
    "RunicNet",
    "reparameterize_model",
    "runicnet",
    "runicnet_tiny",
]

#: Per-variant constructor defaults (any of them can be overridden through ``create_model`` kwargs).
RUNICNET_VARIANTS: dict[str, dict[str, Any]] = {
    "runicnet": {"widths": (32, 64, 128, 256), "depths": (2, 2, 3, 1), "drop_rate": 0.2},
    "runicnet-tiny": {"widths": (16, 32, 64, 128), "depths": (1, 1, 2, 1), "drop_rate": 0.1},
}

_LEAK = 0.1


def _act() -> nn.Module:
    return nn.LeakyReLU(_LEAK, inplace=True)


def _edge_filters() -> torch.Tensor:
    """Fixed Sobel-x, Sobel-y and Laplacian 3×3 filters scaled to unit L2 norm, shape (3, 3, 3)."""
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    filters = torch.stack([sobel_x, sobel_x.t().contiguous(), laplace])
    norms = filters.flatten(1).norm(dim=1).reshape(3, 1, 1)
    return torch.div(filters, norms)


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (Restormer's per-pixel normalization)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        out: torch.Tensor = y.permute(0, 3, 1, 2)
        return out


def _fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BN into the preceding bias-free conv kernel: (kernel', bias')."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise RuntimeError("cannot fold a BatchNorm2d without running statistics")
    std = (var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / std
    return kernel * scale.reshape(-1, 1, 1, 1), beta - mean * scale


class _ConvBN(nn.Module):
    """Bias-free conv followed by BatchNorm."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.conv(x))
        return out

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the conv with the eval-mode BN folded in."""
        return _fold_bn(self.conv.weight, self.bn)


class RepConv3x3(nn.Module):
    """A 3×3 conv (padding 1) trained as parallel branches and fused into one conv for inference.

    Training form: ``BN(conv3×3 x) + BN(conv1×1 x) [+ BN(x)] [+ Σ_k BN(conv1×1(E_k * x))]``, where the
    identity branch exists when ``in_ch == out_ch`` and ``stride == 1`` and ``E_k`` are the fixed
    Sobel-x, Sobel-y and Laplacian filters applied per channel (``edge=True``). All branches are linear,
    so :meth:`reparameterize` can fold them (with the BN running statistics) into ``self.fused``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        groups: int = 1,
        edge: bool = True,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"channels {in_ch}→{out_ch} are not divisible by groups={groups}")
        self.in_ch, self.out_ch, self.stride, self.groups, self.edge = in_ch, out_ch, stride, groups, edge
        self.edge_filters: torch.Tensor
        self.fused: nn.Conv2d | None = None
        self.conv3: _ConvBN | None = None
        self.conv1: _ConvBN | None = None
        self.bn_id: nn.BatchNorm2d | None = None
        self.edge_convs: nn.ModuleList | None = None
        if deploy:
            self.fused = nn.Conv2d(in_ch, out_ch, 3, stride, 1, groups=groups, bias=True)
            return
        self.conv3 = _ConvBN(in_ch, out_ch, 3, stride, groups)
        self.conv1 = _ConvBN(in_ch, out_ch, 1, stride, groups)
        if in_ch == out_ch and stride == 1:
            self.bn_id = nn.BatchNorm2d(in_ch)
        if edge:
            self.edge_convs = nn.ModuleList(_ConvBN(in_ch, out_ch, 1, 1, groups) for _ in range(3))
            self.register_buffer("edge_filters", _edge_filters(), persistent=False)

    @property
    def deploy(self) -> bool:
        """Whether the branches have been fused into a single conv."""
        return self.fused is not None

    def _edge_branches(self) -> list[_ConvBN]:
        return [] if self.edge_convs is None else [cast(_ConvBN, m) for m in self.edge_convs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor
        if self.fused is not None:
            out = self.fused(x)
            return out
        assert self.conv3 is not None and self.conv1 is not None
        out = self.conv3(x) + self.conv1(x)
        if self.bn_id is not None:
            out = out + self.bn_id(x)
        for k, branch in enumerate(self._edge_branches()):
            weight = self.edge_filters[k].to(x.dtype).expand(self.in_ch, 1, 3, 3)
            edges = F.conv2d(x, weight, stride=self.stride, padding=1, groups=self.in_ch)
            out = out + branch(edges)
        return out

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (out, in/groups, 3, 3) kernel and bias of the single conv equal to all branches (eval)."""
        if self.fused is not None:
            bias = self.fused.bias
            assert bias is not None
            return self.fused.weight.detach().clone(), bias.detach().clone()
        assert self.conv3 is not None and self.conv1 is not None
        kernel, bias = self.conv3.fold()
        k1, b1 = self.conv1.fold()
        kernel = kernel + F.pad(k1, [1, 1, 1, 1])
        bias = bias + b1
        per_group = self.in_ch // self.groups
        if self.bn_id is not None:
            ident = torch.zeros_like(kernel)
            for c in range(self.in_ch):
                ident[c, c % per_group, 1, 1] = 1.0
            ki, bi = _fold_bn(ident, self.bn_id)
            kernel, bias = kernel + ki, bias + bi
        for k, branch in enumerate(self._edge_branches()):
            # conv1×1(E * x)[o] = Σ_j W[o, j] (E * x_j) = Σ_j (W[o, j] E) * x_j: a 3×3 kernel.
            w1 = branch.conv.weight  # (out, in/groups, 1, 1)
            ke, be = _fold_bn(w1 * self.edge_filters[k].to(w1), branch.bn)
            kernel, bias = kernel + ke, bias + be
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one 3×3 conv reproducing the eval-mode output (idempotent)."""
        if self.fused is not None:
            return
        kernel, bias = self.equivalent_kernel_bias()
        fused = nn.Conv2d(self.in_ch, self.out_ch, 3, self.stride, 1, groups=self.groups, bias=True)
        fused.to(device=kernel.device, dtype=kernel.dtype)
        fused.weight.copy_(kernel)
        assert fused.bias is not None
        fused.bias.copy_(bias)
        self.fused = fused
        self.conv3 = self.conv1 = self.bn_id = self.edge_convs = None
        if hasattr(self, "edge_filters"):
            del self.edge_filters

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.out_ch}, stride={self.stride}, groups={self.groups}, "
            f"edge={self.edge}, deploy={self.deploy}"
        )


class PixelAttention(nn.Module):
    """Pixel attention (PAN): ``x · σ(conv1×1(x))``, one weight per channel and position."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class ERB(nn.Module):
    """Enhanced residual block: ``rep3×3 → act → [PA] → rep3×3 → act`` (residual via identity branches)."""

    def __init__(self, ch: int, *, pixel_attention: bool = True, edge: bool = True, deploy: bool = False):
        super().__init__()
        self.conv1 = RepConv3x3(ch, ch, edge=edge, deploy=deploy)
        self.act1 = _act()
        self.pa: nn.Module = PixelAttention(ch) if pixel_attention else nn.Identity()
        self.conv2 = RepConv3x3(ch, ch, edge=edge, deploy=deploy)
        self.act2 = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act2(self.conv2(self.pa(self.act1(self.conv1(x)))))
        return out


class HFAB(nn.Module):
    """High-frequency attention block: ``x + σ(A(h)) · h`` with ``h = x − avgpool3×3(x)``.

    ``A`` is FMEN's attention branch: rep3×3 squeeze to ``mid`` channels → act → ERB → rep3×3 excite
    back to ``ch`` channels (its BN branches keep the sigmoid out of saturation).
    """

    def __init__(self, ch: int, mid: int, *, edge: bool = True, deploy: bool = False) -> None:
        super().__init__()
        self.squeeze = RepConv3x3(ch, mid, edge=edge, deploy=deploy)
        self.act = _act()
        self.body = ERB(mid, pixel_attention=False, edge=edge, deploy=deploy)
        self.excite = RepConv3x3(mid, ch, edge=edge, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        attn = torch.sigmoid(self.excite(self.body(self.act(self.squeeze(high)))))
        return x + attn * high


class RunicBlock(nn.Module):
    """One RunicNet block: ERB with pixel attention, enhanced by an HFAB."""

    def __init__(self, ch: int, *, hfab_ratio: int = 4, edge: bool = True, deploy: bool = False) -> None:
        super().__init__()
        self.erb = ERB(ch, edge=edge, deploy=deploy)
        self.hfab = HFAB(ch, max(8, ch // hfab_ratio), edge=edge, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.hfab(self.erb(x))
        return out


class GDFNTransition(nn.Module):
    """Gated-dconv feed-forward network (Restormer) with a shortcut, optionally down-sampling.

    ``shortcut(x) + conv1×1(GELU(a) · b)`` where ``a, b`` split ``dwconv3×3(conv1×1(LN(x)))``; the
    depthwise conv carries the stride. The per-pixel LayerNorm keeps the gate's product bounded even
    before BatchNorm statistics exist.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, expansion: float = 2.0) -> None:
        super().__init__()
        hidden = max(8, round(in_ch * expansion))
        self.norm = _LayerNorm2d(in_ch)
        self.project_in = nn.Conv2d(in_ch, 2 * hidden, 1)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, stride, 1, groups=2 * hidden)
        self.project_out = nn.Conv2d(hidden, out_ch, 1)
        self.shortcut: nn.Module
        if in_ch == out_ch and stride == 1:
            self.shortcut = nn.Identity()
        else:
            pool: nn.Module = (
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                if stride > 1
                else nn.Identity()
            )
            self.shortcut = nn.Sequential(
                pool, nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dwconv(self.project_in(self.norm(x))).chunk(2, dim=1)
        out: torch.Tensor = self.shortcut(x) + self.project_out(F.gelu(a) * b)
        return out


class RunicNet(nn.Module):
    """RunicNet classifier (see the module docstring); timm-like ``forward_features``/``forward_head``.

    Args:
        num_classes: output logits (0: ``forward`` returns the pooled features).
        in_chans: input channels (3 = RGB, 4 = RGB + nucleus mask).
        widths, depths: channels and number of :class:`RunicBlock` per stage.
        stem_width: channels after the first stem conv (default ``max(8, widths[0] // 2)``).
        hfab_ratio: HFAB attention branch width is ``max(8, width // hfab_ratio)``.
        gdfn_expansion: hidden-width factor of the GDFN transitions.
        drop_rate: dropout before the head.
        edge: add the fixed-edge (Sobel/Laplacian) branches to every re-parameterizable conv.
        deploy: build the fused (inference) form directly, e.g. to load weights saved after
            :meth:`reparameterize` (the bundle then needs ``arch_kwargs={"deploy": true}``).
    """

    task: ClassVar[str] = "classification"

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (2, 2, 3, 1),
        stem_width: int | None = None,
        hfab_ratio: int = 4,
        gdfn_expansion: float = 2.0,
        drop_rate: float = 0.2,
        edge: bool = True,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        widths, depths = tuple(int(w) for w in widths), tuple(int(d) for d in depths)
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"need num_classes ≥ 0 and in_chans ≥ 1, got {num_classes}, {in_chans}")
        if not widths or len(widths) != len(depths) or min(widths) < 1 or min(depths) < 0:
            raise ValueError(f"widths {widths} and depths {depths} must be positive and of equal length")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if hfab_ratio < 1 or gdfn_expansion <= 0:
            raise ValueError(
                f"need hfab_ratio ≥ 1 and gdfn_expansion > 0, got {hfab_ratio}, {gdfn_expansion}"
            )
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.num_features = widths[-1]
        stem_w = stem_width or max(8, widths[0] // 2)
        rep: dict[str, bool] = {"edge": edge, "deploy": deploy}

        self.stem = nn.Sequential(
            RepConv3x3(in_chans, stem_w, stride=2, **rep),
            _act(),
            RepConv3x3(stem_w, widths[0], stride=2, **rep),
            _act(),
        )
        stages: list[nn.Module] = []
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks: list[nn.Module] = [RunicBlock(width, hfab_ratio=hfab_ratio, **rep) for _ in range(depth)]
            last = i == len(widths) - 1
            out_w = width if last else widths[i + 1]
            blocks.append(GDFNTransition(width, out_w, stride=1 if last else 2, expansion=gdfn_expansion))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.act = _act()
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def deploy(self) -> bool:
        """Whether every re-parameterizable conv is in its fused form."""
        return all(m.deploy for m in self.modules() if isinstance(m, RepConv3x3))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (B, num_features, H/32, W/32)."""
        out: torch.Tensor = self.act(self.norm(self.stages(self.stem(x))))
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and (unless ``pre_logits``) the linear head."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (fresh weights) for ``num_classes`` outputs (0: none)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reparameterize(self) -> RunicNet:
        """Fuse every re-parameterizable conv in place (eval outputs unchanged); returns ``self``."""
        reparameterize_model(self)
        return self


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Fuse every :class:`RepConv3x3` inside ``model`` in place; returns ``model``."""
    for module in list(model.modules()):
        if isinstance(module, RepConv3x3):
            module.reparameterize()
    return model


def _build(variant: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> RunicNet:
    if kwargs.pop("pretrained", False):
        raise BundleError(f"{variant} has no pretrained weights; load a trained model bundle instead")
    return RunicNet(num_classes=num_classes, in_chans=in_chans, **{**RUNICNET_VARIANTS[variant], **kwargs})


@register_architecture("runicnet")
def runicnet(*, num_classes: int, in_chans: int = 3, **kwargs: Any) -> RunicNet:
    """RunicNet, default size (3.7 M params and 0.73 GMACs at 224 px once re-parameterized)."""
    return _build("runicnet", num_classes, in_chans, kwargs)


@register_architecture("runicnet-tiny")
def runicnet_tiny(*, num_classes: int, in_chans: int = 3, **kwargs: Any) -> RunicNet:
    """RunicNet-tiny, for CPU training (0.8 M params and 0.13 GMACs at 224 px once re-parameterized)."""
    return _build("runicnet-tiny", num_classes, in_chans, kwargs)
