"""pipelines/train_classifier_real.py: the two sides of the cross-source table and its figures."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_scripts import load_pipeline

from wsi_screen.train.data import CropSet

tcr = load_pipeline("train_classifier_real")


def _crops(rows: list[tuple[str, str]]) -> CropSet:
    """One 8×8 crop per (source, class) row, each in a group of its own."""
    names = tcr.CLASSES
    n = len(rows)
    return CropSet(
        crops=np.zeros((n, 8, 8, 3), np.uint8),
        labels=np.array([names.index(c) for _, c in rows], np.int64),
        groups=np.array([f"g{i}" for i in range(n)]),
        class_names=list(names),
        mpp=0.25,
        sources=np.array([s for s, _ in rows]),
    )


def test_cross_source_sides_hold_only_the_shared_classes_of_their_source() -> None:
    data = _crops(
        [
            ("herlev", "NILM"),
            ("herlev", "endocervical"),
            ("herlev", "LSIL"),
            ("herlev", "HSIL"),
            ("lbc_nuclei", "NILM"),
            ("lbc_cells", "organism"),
            ("lbc_cells", "LSIL"),
            ("lbc_cells", "HSIL"),
            ("lbc_cells", "ASC-US"),  # not shared: left out
            ("lbc_cells", "SCC"),
            ("synthetic", "HSIL"),  # neither side
        ]
    )
    herlev = tcr.cross_source_side(data, "herlev")
    lbc = tcr.cross_source_side(data, "lbc")
    assert herlev.class_names == lbc.class_names == ["NILM", "LSIL", "HSIL"]
    assert herlev.groups.tolist() == ["g0", "g1", "g2", "g3"]
    assert herlev.labels.tolist() == [0, 0, 1, 2]  # endocervical counts as NILM
    assert lbc.groups.tolist() == ["g4", "g5", "g6", "g7"]
    assert lbc.labels.tolist() == [0, 0, 1, 2]  # organism counts as NILM
    with pytest.raises(ValueError, match="unknown cross-source side 'cric'"):
        tcr.cross_source_side(data, "cric")


def test_cross_figures_and_pooling() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # NILM, right, score 0.1
            [0.6, 0.3, 0.1],  # NILM, right, score 0.4: flagged at 0.35
            [0.2, 0.2, 0.6],  # NILM called HSIL, flagged
            [0.3, 0.6, 0.1],  # LSIL right
            [0.1, 0.2, 0.7],  # HSIL right, score 0.9
            [0.5, 0.3, 0.2],  # HSIL called NILM, score 0.5: flagged
        ]
    )
    out = tcr.cross_figures(probs, labels, np.array([f"g{i}" for i in range(6)]), 0.35)
    assert out["n"] == {"NILM": 3, "LSIL": 1, "HSIL": 2}
    assert out["accuracy"]["value"] == pytest.approx(4 / 6)
    assert out["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert out["sensitivity"]["value"] == 1.0 and out["specificity"]["value"] == pytest.approx(1 / 3)
    assert out["lsil_recall"]["value"] == 1.0 and out["hsil_recall"]["value"] == 0.5
    # Scores of positives 0.7, 0.9, 0.5 against negatives 0.1, 0.4, 0.8: 7 of the 9 pairs won.
    assert out["auroc_binary"] == pytest.approx(7 / 9)
    a_lo, a_hi = out["auroc_binary_ci95"]
    assert 0.0 <= a_lo <= a_hi <= 1.0
    lo, hi = out["accuracy"]["ci95"]
    assert 0.0 <= lo <= 4 / 6 <= hi <= 1.0
    # The shipped classes pool onto the three: every class lands in exactly one pooled column.
    pooled = [c for members in tcr.CROSS_POOL.values() for c in members]
    assert sorted(pooled) == sorted(tcr.CLASSES)
    p10 = np.eye(len(tcr.CLASSES))
    got = tcr._pool_probs(p10)
    assert np.allclose(got.sum(axis=1), 1.0)
    assert got[tcr.CLASSES.index("ASC-H")].tolist() == [0.0, 0.0, 1.0]
    assert got[tcr.CLASSES.index("organism")].tolist() == [1.0, 0.0, 0.0]


def test_paired_auroc_difference() -> None:
    """Equal scores differ by exactly 0 in every resample; a score that ranks every positive above every
    negative gains 1 − AUROC(a), and its interval lies above 0."""
    rng = np.random.default_rng(0)
    positive = np.arange(60) % 3 == 0
    groups = np.array([f"c{i // 2}" for i in range(60)])  # two crops per cell
    a = rng.uniform(size=60) + 0.3 * positive
    same = tcr._paired_auroc_difference(a, a.copy(), positive, groups, reps=200)
    assert same == {"value": 0.0, "ci95": [0.0, 0.0]}
    from sklearn.metrics import roc_auc_score

    perfect = positive.astype(float) + 0.01 * a
    gain = tcr._paired_auroc_difference(a, perfect, positive, groups, reps=200)
    assert gain["value"] == pytest.approx(1.0 - roc_auc_score(positive, a))
    assert 0.0 < gain["ci95"][0] <= gain["value"] <= gain["ci95"][1]


def test_ablation_variants_are_trainable_first_stages() -> None:
    """The sampling and backbone ablations are first stages from random weights, on registered
    architectures, and nothing else about their recipe changes."""
    from wsi_screen.models.registry import is_architecture

    for variant in (*tcr.NATURAL_DRAW_VARIANTS, *tcr.VARIANT_ARCH):
        assert variant in tcr.VARIANTS
        assert tcr.FIRST_STAGE_INIT[variant] is None
    assert all(is_architecture(a) for a in tcr.VARIANT_ARCH.values())
    assert not is_architecture("runicnet-none")
    assert "scratch" not in tcr.NATURAL_DRAW_VARIANTS and "scratch" not in tcr.VARIANT_ARCH


def test_head_folds_keep_groups_together_and_head_features_are_known() -> None:
    from wsi_screen.cells import MORPHOMETRICS
    from wsi_screen.score_head import TRANSFORMS

    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "f", "f"])
    folds = tcr._group_folds(groups, 3, seed=0)
    for g in set(groups.tolist()):
        assert len(set(folds[groups == g].tolist())) == 1  # a cell's detections share a fold
    assert set(folds.tolist()) == {0, 1, 2}  # six groups over three folds: none empty
    for spec in tcr.HEAD_FEATURES.values():
        assert all(f in MORPHOMETRICS and t in TRANSFORMS for f, t in spec)
    assert "head" in tcr.STAGES and "head" not in tcr.DEFAULT_STAGES
