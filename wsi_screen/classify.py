"""Cell-centred crops cut on the device, and batched (ensemble) classification.

Crops are gathered from the normalized read windows with one advanced-indexing operation per batch
(no per-cell Python loop): a crop centred on a cell near a core edge still lies inside its window,
because the halo is at least half a crop wide (``tiling.halo_um`` ≥ crop size × µm/px / 2).

Classifier input representations (``bundle.input_representation``, :data:`REPRESENTATIONS`):

- ``rgb``: the Reinhard-normalized crop;
- ``rgb+mask``: the crop plus a fourth channel, the **nucleus mask** — 255 inside every nucleus
  outline the localizer found in the window (:func:`nucleus_mask`), 0 elsewhere — cut from the same
  window at the same place (segmentation-informed classification). Training cuts it by the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.errors import BundleError
from wsi_screen.runtime import autocast_context
from wsi_screen.score_head import ScoreHead

if TYPE_CHECKING:
    import torch

    from wsi_screen.models.bundle import ModelBundle

__all__ = [
    "MASK_REPRESENTATION",
    "REPRESENTATIONS",
    "CellClassifier",
    "cut_crops",
    "cut_mask_crops",
    "nucleus_mask",
    "score_head_of",
]

logger = logging.getLogger(__name__)

_PAD_VALUE = 255  # crops running off a window are filled with white glass
#: Classifier input representations and their number of channels.
REPRESENTATIONS: dict[str, int] = {"rgb": 3, "rgb+mask": 4}
#: The representation with the nucleus-mask channel.
MASK_REPRESENTATION = "rgb+mask"


def nucleus_mask(outlines: Sequence[NDArray[np.floating[Any]]], shape: tuple[int, int]) -> NDArray[np.uint8]:
    """A (H, W) uint8 mask, 255 inside any of the nucleus ``outlines`` and 0 elsewhere.

    Outlines are (K, 2) polygons of (x, y) in continuous window pixels (pixel ``i`` spans
    ``[i, i + 1)``, as a ``"window"``-frame :class:`wsi_screen.cells.CellTable` gives them); a pixel is
    inside when its centre is. Outlines with fewer than three vertices are ignored.
    """
    from skimage.draw import polygon

    h, w = shape
    out = np.zeros((h, w), np.uint8)
    for o in outlines:
        if len(o) < 3:
            continue
        rr, cc = polygon(  # type: ignore[no-untyped-call]
            np.asarray(o[:, 1], np.float64) - 0.5, np.asarray(o[:, 0], np.float64) - 0.5, shape=(h, w)
        )
        out[rr, cc] = 255
    return out


def cut_crops(
    windows: torch.Tensor,
    tile_index: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    size: int,
    *,
    pad_value: int = _PAD_VALUE,
) -> torch.Tensor:
    """Gather ``size``×``size`` crops centred on (cx, cy) from channels-last windows.

    Args:
        windows: (B, H, W, C) tensor (uint8 or float) on any device.
        tile_index: (N,) window index of each crop.
        cx, cy: (N,) integer crop centres in window pixels (the centre pixel is ``size // 2``).
        size: crop side in pixels.

    Returns:
        (N, size, size, C) tensor on the windows' device; parts outside a window are ``pad_value``.
    """
    import torch

    if windows.ndim != 4:
        raise ValueError(f"windows must be (B, H, W, C), got shape {tuple(windows.shape)}")
    n = int(tile_index.shape[0])
    _b, h, w, c = windows.shape
    if n == 0:
        return windows.new_empty((0, size, size, c))
    half = size // 2
    dev = windows.device
    offs = torch.arange(size, device=dev) - half
    ys = cy.to(dev).long()[:, None] + offs[None, :]
    xs = cx.to(dev).long()[:, None] + offs[None, :]
    inside_any = (ys.min() >= 0) and (xs.min() >= 0) and (ys.max() < h) and (xs.max() < w)
    if bool(inside_any):
        src = windows
    else:
        src = torch.nn.functional.pad(
            windows.permute(0, 3, 1, 2), (half, half, half, half), value=float(pad_value)
        ).permute(0, 2, 3, 1)
        ys = ys + half
        xs = xs + half
    ti = tile_index.to(dev).long()
    return src[ti[:, None, None], ys[:, :, None], xs[:, None, :]]


def cut_mask_crops(
    outlines: Sequence[Sequence[NDArray[np.floating[Any]]]],
    window_shape: tuple[int, int],
    tile_index: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    size: int,
    *,
    device: torch.device,
) -> torch.Tensor:
    """The nucleus-mask channel of crops: (N, size, size, 1) uint8 on ``device``.

    ``outlines[b]`` are the nucleus outlines the localizer found in window ``b`` (window px); each
    window's :func:`nucleus_mask` is cut like :func:`cut_crops` cuts the RGB crops (0 off the window).
    """
    import torch

    masks = np.zeros((len(outlines), *window_shape), np.uint8)
    for b, window_outlines in enumerate(outlines):
        masks[b] = nucleus_mask(window_outlines, window_shape)
    return cut_crops(torch.from_numpy(masks)[..., None].to(device), tile_index, cx, cy, size, pad_value=0)


#: Test-time augmentation: the dihedral views (rotation by k·90°, then a left-right flip or not) used
#: for each supported number of views. A cell has no orientation, so every view is a valid crop.
TTA_VIEWS: dict[int, tuple[tuple[int, bool], ...]] = {
    1: ((0, False),),
    2: ((0, False), (0, True)),
    4: ((0, False), (0, True), (2, False), (2, True)),
    8: tuple((k, f) for k in range(4) for f in (False, True)),
}


def _dihedral(x: torch.Tensor, view: tuple[int, bool]) -> torch.Tensor:
    """``x`` (N, C, H, W) rotated by ``view[0]`` × 90° and, if ``view[1]``, flipped left-right."""
    import torch

    k, flip = view
    if not k and not flip:
        return x
    if k:
        x = torch.rot90(x, k, dims=(2, 3))
    if flip:
        x = torch.flip(x, dims=(3,))
    return x.contiguous(memory_format=torch.channels_last) if x.device.type != "mps" else x.contiguous()


class CellClassifier:
    """One bundle, or several whose probabilities are averaged (an ensemble)."""

    def __init__(
        self,
        bundles: Sequence[ModelBundle],
        *,
        device: torch.device,
        batch_size: int = 128,
        pad_batches: bool | None = None,
        cpu_bf16: bool = False,
        tta: int = 1,
    ) -> None:
        """``pad_batches``: pad each forward batch with blank crops to the next power of two (at
        least 32, at most ``batch_size``), so the model sees a handful of batch shapes rather than
        one per device batch; default: on CUDA, where cuDNN autotunes every new shape (seconds
        each for a whole network). ``cpu_bf16``: bf16 autocast on the CPU too (``runtime.cpu_bf16``).
        ``tta``: test-time augmentation, the probabilities averaged over this many of the 8 flips and
        90° rotations of each crop (:data:`TTA_VIEWS`; 1 = the crop as it is), at ``tta`` × the cost."""
        import torch

        if tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {', '.join(map(str, TTA_VIEWS))} views, got {tta!r}")

        if not bundles:
            raise BundleError("at least one classifier bundle is needed")
        first = bundles[0].config
        for b in bundles:
            cfg = b.config
            if cfg.task != "classification":
                raise BundleError(f"bundle {cfg.name} is a {cfg.task} model, not a classifier")
            if cfg.inference.get("backbone_only"):
                raise BundleError(
                    f"bundle {cfg.name} is a self-supervised backbone without a classifier: train one from "
                    f"it (wsi-screen train classifier --init {cfg.name}) and screen with that"
                )
            for attr in ("class_names", "input_size", "mpp", "input_representation"):
                if getattr(cfg, attr) != getattr(first, attr):
                    raise BundleError(
                        f"ensemble members disagree on {attr}: {first.name} has {getattr(first, attr)!r}, "
                        f"{cfg.name} has {getattr(cfg, attr)!r}"
                    )
            rep = cfg.input_representation
            if rep not in REPRESENTATIONS:
                raise BundleError(
                    f"bundle {cfg.name}: unknown input_representation {rep!r} for a classifier; "
                    f"known: {', '.join(REPRESENTATIONS)}"
                )
            if cfg.in_channels != REPRESENTATIONS[rep] or len(cfg.mean) != cfg.in_channels:
                raise BundleError(
                    f"bundle {cfg.name}: input_representation {rep!r} needs {REPRESENTATIONS[rep]} input "
                    f"channels (and as many mean/std values); the bundle says {cfg.in_channels} "
                    f"({len(cfg.mean)} mean values)"
                )
        self.bundles = list(bundles)
        #: Each bundle's score head (``inference.score_head``), or None (see :mod:`wsi_screen.score_head`).
        self.heads: list[ScoreHead | None] = [score_head_of(b) for b in self.bundles]
        self.device = device
        self.batch_size = int(batch_size)
        self.pad_batches = device.type == "cuda" if pad_batches is None else bool(pad_batches)
        self.cpu_bf16 = bool(cpu_bf16)
        self.tta = int(tta)
        self.class_names: list[str] = list(first.class_names)
        self.abnormal_classes: list[str] = list(first.abnormal_classes)
        self.input_size = int(first.input_size)
        self.mpp = float(first.mpp)
        self.input_representation = str(first.input_representation)
        self.in_channels = REPRESENTATIONS[self.input_representation]
        self._models = []
        self._norm = []
        for b in self.bundles:
            model = b.build_model(device=device)
            if device.type != "mps":
                model = model.to(memory_format=torch.channels_last)
            self._models.append(model)
            mean = torch.tensor(b.config.mean, device=device).view(1, -1, 1, 1) * 255.0
            std = torch.tensor(b.config.std, device=device).view(1, -1, 1, 1) * 255.0
            self._norm.append((mean, std))

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.bundles]

    @property
    def morphometrics(self) -> tuple[str, ...]:
        """The morphometrics :meth:`predict` needs (the score heads' inputs; empty without a head)."""
        names: list[str] = []
        for head in self.heads:
            for f in head.features if head is not None else ():
                if f not in names:
                    names.append(f)
        return tuple(names)

    @property
    def needs_mask(self) -> bool:
        """Whether the crops must carry the nucleus-mask channel (``rgb+mask`` bundles)."""
        return self.input_representation == MASK_REPRESENTATION

    def predict(
        self, crops: torch.Tensor, *, morphometrics: Mapping[str, NDArray[Any]] | None = None
    ) -> torch.Tensor:
        """Class probabilities (N, K) float32 for uint8 channels-last crops (N, H, W, C).

        C is :attr:`in_channels`: 3 (RGB) or 4 (RGB + nucleus mask, :attr:`needs_mask`).
        ``morphometrics``: the localizer's measurements of the N cells (:data:`~wsi_screen.cells.
        MORPHOMETRICS` columns), needed when a bundle has a score head (:attr:`morphometrics`).
        """
        import torch

        if crops.ndim != 4 or int(crops.shape[3]) != self.in_channels:
            raise ValueError(
                f"{' + '.join(self.names)} takes ({self.input_representation}) crops of shape "
                f"(N, H, W, {self.in_channels}), got {tuple(crops.shape)}"
            )
        n = int(crops.shape[0])
        out = torch.zeros((n, len(self.class_names)), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        needed = self.morphometrics
        if needed:
            missing = [f for f in needed if morphometrics is None or f not in morphometrics]
            if missing:
                raise ValueError(
                    f"{' + '.join(self.names)} has a score head that needs the cells' morphometrics "
                    f"{', '.join(missing)}; classify cells found by a localizer (run_slide) or pass them"
                )
        abnormal_index = [self.class_names.index(c) for c in self.abnormal_classes]
        with torch.inference_mode(), autocast_context(self.device, cpu_bf16=self.cpu_bf16):
            for start in range(0, n, self.batch_size):
                chunk = crops[start : start + self.batch_size].to(self.device, non_blocking=True)
                m = int(chunk.shape[0])
                if self.pad_batches and m < self.batch_size:
                    size = min(self.batch_size, max(32, 1 << (m - 1).bit_length()))
                    chunk = torch.cat([chunk, chunk.new_zeros((size - m, *chunk.shape[1:]))])
                x = chunk.permute(0, 3, 1, 2).float()
                if self.device.type != "mps":
                    x = x.contiguous(memory_format=torch.channels_last)
                acc = torch.zeros((x.shape[0], len(self.class_names)), device=self.device)
                for model, (mean, std), head in zip(self._models, self._norm, self.heads, strict=True):
                    member = torch.zeros_like(acc)
                    for view in TTA_VIEWS[self.tta]:
                        logits = model((_dihedral(x, view) - mean) / std)
                        member += torch.softmax(logits.float(), dim=1)
                    if head is not None and morphometrics is not None:
                        rows = {f: np.asarray(morphometrics[f])[start : start + m] for f in head.features}
                        refit = head.apply((member[:m] / self.tta).cpu().numpy(), abnormal_index, rows)
                        member = torch.zeros_like(member)
                        member[:m] = torch.from_numpy(refit).to(self.device) * self.tta
                    acc += member
                out[start : start + m] = (acc / (len(self._models) * self.tta))[:m]
        return out


def score_head_of(bundle: ModelBundle) -> ScoreHead | None:
    """The bundle's score head (``inference.score_head``), validated against ``extra_features``."""
    cfg = bundle.config
    spec = cfg.inference.get("score_head")
    if spec is None:
        return None
    try:
        head = ScoreHead.from_dict(spec)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {cfg.name}: invalid inference.score_head: {exc}") from None
    if list(head.features) != list(cfg.extra_features):
        raise BundleError(
            f"bundle {cfg.name}: inference.score_head uses {list(head.features)} but extra_features "
            f"lists {list(cfg.extra_features)}; they must agree"
        )
    if not cfg.abnormal_classes or set(cfg.abnormal_classes) == set(cfg.class_names):
        raise BundleError(f"bundle {cfg.name}: a score head needs abnormal and other classes")
    return head
