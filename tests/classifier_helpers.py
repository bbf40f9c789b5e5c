"""Helpers for the classifier-training tests: a classical nucleus detector standing in for the U-Net."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from wsi_screen.cells import MORPHOMETRICS, CellTable
from wsi_screen.models.bundle import BundleConfig, ModelBundle, load_bundle, save_bundle
from wsi_screen.models.registry import create_model
from wsi_screen.synth import CellSpec, synthesize_slide

#: Seven cells of several kinds, well apart, on a 1800² px synthetic slide (``write_small_slide``).
SMALL_SLIDE_CELLS = (
    CellSpec(300.0, 300.0, "hsil", seed=1),
    CellSpec(700.0, 300.0, "intermediate", seed=2),
    CellSpec(300.0, 700.0, "koilocyte", seed=3),
    CellSpec(700.0, 700.0, "ascus", seed=4),
    CellSpec(1200.0, 1200.0, "neutrophil", seed=5),
    CellSpec(1400.0, 500.0, "hsil", seed=6),
    CellSpec(500.0, 1400.0, "superficial", seed=7),
)


def write_small_slide(path: Path) -> Path:
    """Draw the 1800² px slide of :data:`SMALL_SLIDE_CELLS` (with its truth) at ``path``."""
    synthesize_slide(path, size=(1800, 1800), cells=SMALL_SLIDE_CELLS, seed=2, workers=1)
    return path


class ThresholdLocalizer:
    """Dark blobs (mean optical density above ``od``) as nucleus candidates: no model, no weights.

    It has the interface :class:`~wsi_screen.pipeline.TileProcessor` uses (``localize`` and
    ``device``), so tests run the real device stage without a trained U-Net.
    """

    def __init__(self, *, od: float = 0.45, min_area_px: int = 40, device: str = "cpu") -> None:
        self.od = od
        self.min_area_px = min_area_px
        self.device = torch.device(device)
        self.bundle: Any = None

    def localize(self, windows: torch.Tensor, *, window_mpp: float, halo_px: int) -> list[CellTable]:
        out = []
        for w in windows.cpu().numpy():
            od = -np.log10(np.clip(w.astype(np.float32), 1.0, None) / 255.0).mean(axis=2)
            labels, n = ndi.label(od > self.od)
            if n == 0:
                out.append(CellTable.empty(frame="window"))
                continue
            idx = np.arange(1, n + 1)
            area = ndi.sum_labels(np.ones_like(od), labels, idx)
            keep = idx[area >= self.min_area_px]
            if not len(keep):
                out.append(CellTable.empty(frame="window"))
                continue
            com = np.array(ndi.center_of_mass(np.ones_like(od), labels, keep)).reshape(-1, 2)
            x, y = com[:, 1] + 0.5, com[:, 0] + 0.5
            k = len(keep)
            outlines = [
                np.array([[xi - 4, yi - 4], [xi + 4, yi - 4], [xi + 4, yi + 4], [xi - 4, yi + 4]], np.float32)
                for xi, yi in zip(x, y, strict=True)
            ]
            out.append(
                CellTable.from_rows(
                    x=x.astype(np.float64),
                    y=y.astype(np.float64),
                    detection_score=np.ones(k, np.float32),
                    morphometrics={m: np.zeros(k, np.float32) for m in MORPHOMETRICS},
                    outlines=outlines,
                    frame="window",
                )
            )
        return out


def tiny_classifier_bundle(
    folder: Path, class_names: list[str], abnormal_classes: list[str], **config: Any
) -> ModelBundle:
    """A seeded, randomly initialised MobileNetV3 (×0.5) classifier bundle on 64² crops at 0.25 µm/px,
    saved to ``folder`` (named after it); ``config``: further :class:`BundleConfig` fields."""
    torch.manual_seed(0)
    cfg = BundleConfig(
        name=folder.name,
        task="classification",
        architecture="mobilenetv3_small_050",
        input_size=64,
        mpp=0.25,
        class_names=class_names,
        abnormal_classes=abnormal_classes,
        **config,
    )
    model = create_model(cfg.architecture, num_classes=len(class_names))
    return load_bundle(save_bundle(model, cfg, folder).path)
