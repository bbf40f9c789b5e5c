"""Issue 8: Herlev folds, the Herlev class map against the data, and the shipped classifier bundles.

The rescale/crop/pad rule, the class-map presets and ``grouped_kfold`` on synthetic groups are tested
in ``test_train_classifier.py`` and ``test_metrics.py``; these tests add the real Herlev manifest
(skipped when ``../shared/data/herlev`` is absent) and a forward pass of every shipped classifier.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from wsi_screen.metrics import grouped_kfold
from wsi_screen.train.data import fit_to_size, load_class_map, rescale_to_mpp


def _herlev_manifest(shared_data: Path) -> list[dict[str, str]]:
    path = shared_data / "herlev" / "manifest.csv"
    if not path.is_file():
        pytest.skip("no Herlev data (../shared/data/herlev)")
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_herlev_folds_never_split_a_group(shared_data: Path) -> None:
    rows = _herlev_manifest(shared_data)
    groups = np.array([r["group"] for r in rows])
    labels = np.array([{"NILM": 0, "LSIL": 1, "HSIL": 2}[r["bethesda"]] for r in rows])
    folds = grouped_kfold(groups, 5, seed=0, stratify_labels=labels)
    fold_of_group: dict[str, int] = {}
    for k, (train, test) in enumerate(folds):
        assert not set(groups[train]) & set(groups[test])
        for g in groups[test].tolist():
            assert fold_of_group.setdefault(g, k) == k  # one group, one fold
        # every fold holds every class (stratified as far as the groups allow)
        assert set(labels[test].tolist()) == {0, 1, 2}
    assert len(fold_of_group) == len(set(groups.tolist()))


def test_herlev_preset_matches_the_manifest_mapping(shared_data: Path) -> None:
    rows = _herlev_manifest(shared_data)
    preset = load_class_map("herlev-bethesda")
    for r in rows:
        assert preset[r["herlev_class"]] == r["bethesda"], r["file"]


def test_a_crop_at_0201_um_px_keeps_its_physical_size() -> None:
    # A Herlev-like 150 × 100 px crop at 0.201 µm/px is 30.15 × 20.1 µm; at 0.25 µm/px that is
    # 121 × 80 px, centred on the 224 px canvas with glass around it.
    img = np.full((100, 150, 3), 90, np.uint8)
    out = rescale_to_mpp(img, src_mpp=0.201, dst_mpp=0.25)
    assert out.shape[:2] == (round(100 * 0.201 / 0.25), round(150 * 0.201 / 0.25))
    canvas = fit_to_size(out, 224, fill=(241, 238, 242))
    ys, xs = np.nonzero(canvas[..., 0] < 200)
    assert (ys.max() - ys.min() + 1) * 0.25 == pytest.approx(20.1, abs=0.25)
    assert (xs.max() - xs.min() + 1) * 0.25 == pytest.approx(30.15, abs=0.25)
    assert xs.mean() == pytest.approx(111.5, abs=1.0) and ys.mean() == pytest.approx(111.5, abs=1.0)


def test_shipped_classifiers_classify_a_tiny_batch() -> None:
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.models import list_bundles
    from wsi_screen.models.bundle import load_bundle

    names = [n for n in list_bundles() if load_bundle(n).config.task == "classification"]
    assert "cyto-synth-v1" in names
    rng = np.random.default_rng(0)
    for name in names:
        bundle = load_bundle(name, task="classification")
        size = bundle.config.input_size
        crops = torch.from_numpy(rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8))
        probs = CellClassifier([bundle], device=torch.device("cpu")).predict(crops).numpy()
        assert probs.shape == (3, len(bundle.config.class_names)), name
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_real_cell_bundle_records_its_provenance() -> None:
    from wsi_screen.models.registry import bundle_dir

    path = bundle_dir("cyto-herlev-v1")
    if path is None:
        pytest.skip("cyto-herlev-v1 is not shipped")
    cfg = json.loads((path / "bundle.json").read_text(encoding="utf-8"))
    data = cfg["training"]["data"]
    assert data["real_classes"] == ["NILM", "LSIL", "HSIL"]
    assert set(data["synthetic_classes"]) | set(data["real_classes"]) == set(cfg["class_names"])
    cv = cfg["metrics"]["cross_validation"]
    assert cv["n_folds"] == 5
    for key in ("accuracy", "macro_f1", "hsil_recall", "binary_auroc"):
        assert 0.0 <= cv["mean_sd"][key]["mean"] <= 1.0
