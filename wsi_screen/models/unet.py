"""The nucleus-localization U-Net: segmentation-models-pytorch ``Unet`` with a light timm encoder.

Registered as ``"smp-unet"``::

    model = create_model("smp-unet", num_classes=3, in_chans=1)   # (B, 1, H, W) → (B, 3, H, W) logits

Any input size works: the input is padded (edge replication) to a multiple of the encoder's output
stride and the logits are cropped back, so the output always has the input's height and width.
No weights are ever downloaded (``encoder_weights=None``); the trained weights come from a bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from wsi_screen.errors import BundleError
from wsi_screen.models.registry import register_architecture

__all__ = ["DEFAULT_DECODER_CHANNELS", "DEFAULT_ENCODER", "SmpUNet", "smp_unet"]

#: A light timm encoder: ≈ 2.0 M parameters with the default decoder, fast on a CPU (speed in
#: docs/performance.md, *The default small networks*).
DEFAULT_ENCODER = "tu-mobilenetv3_small_100"
DEFAULT_DECODER_CHANNELS: tuple[int, ...] = (128, 64, 32, 16, 8)


class SmpUNet(nn.Module):
    """``smp.Unet`` returning (B, num_classes, H, W) logits for inputs of any size."""

    task = "segmentation"

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int = 1,
        encoder_name: str = DEFAULT_ENCODER,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        encoder_depth: int | None = None,
        decoder_attention_type: str | None = None,
    ) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        channels = tuple(int(c) for c in decoder_channels)
        depth = len(channels) if encoder_depth is None else int(encoder_depth)
        if depth != len(channels):
            raise ValueError(f"encoder_depth {depth} needs {depth} decoder_channels, got {channels}")
        self.net = smp.Unet(
            encoder_name=encoder_name,
            encoder_depth=depth,
            encoder_weights=None,
            decoder_channels=channels,
            decoder_attention_type=decoder_attention_type,
            in_channels=int(in_chans),
            classes=int(num_classes),
        )
        self.stride = int(2**depth)
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        out: torch.Tensor = self.net(x)
        return out[..., :h, :w] if (ph or pw) else out


@register_architecture("smp-unet")
def smp_unet(*, num_classes: int, in_chans: int = 1, pretrained: bool = False, **kwargs: Any) -> SmpUNet:
    """Factory: ``encoder_name``, ``decoder_channels``, ``encoder_depth``, ``decoder_attention_type``."""
    if pretrained:
        raise BundleError("smp-unet has no downloadable weights; load a bundle (pretrained=False)")
    kwargs.pop("encoder_weights", None)
    return SmpUNet(num_classes=num_classes, in_chans=in_chans, **kwargs)
