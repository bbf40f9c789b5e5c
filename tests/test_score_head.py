"""The score head (:mod:`wsi_screen.score_head`): fit, serialization, and its path through screening."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.classifier_helpers import ThresholdLocalizer, tiny_classifier_bundle
from wsi_screen.cells import MORPHOMETRICS, CellTable, abnormality_score
from wsi_screen.classify import CellClassifier, score_head_of
from wsi_screen.errors import BundleError, DataError
from wsi_screen.models.bundle import load_bundle
from wsi_screen.score_head import ScoreHead, fit_logistic, fit_score_head

CPU = torch.device("cpu")
CLASSES = ["NILM", "LSIL", "HSIL", "artifact"]
ABNORMAL = ["LSIL", "HSIL"]


def _head(**changes: Any) -> ScoreHead:
    spec: dict[str, Any] = {
        "features": ("nucleus_area_um2", "nucleus_circularity"),
        "transforms": ("log", "identity"),
        "center": (np.log(40.0), 0.8),
        "scale": (0.5, 0.1),
        "coef_score": 1.5,
        "coef": (2.0, -0.5),
        "intercept": -0.3,
    }
    spec.update(changes)
    return ScoreHead(**spec)


# -- the regression ----------------------------------------------------------------------------------


def test_fit_logistic_recovers_the_coefficients_of_simulated_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40_000, 3))
    true_w, true_b = np.array([1.5, -2.0, 0.0]), 0.7
    y = rng.random(40_000) < 1 / (1 + np.exp(-(x @ true_w + true_b)))
    w, b = fit_logistic(x, y, l2=1e-3)
    # Maximum likelihood on 40,000 rows: the standard error of each coefficient is ≈ 0.02, so 0.1 is
    # five of them; a sign or scale error (the bugs this guards) is off by ≥ 1.
    np.testing.assert_allclose(w, true_w, atol=0.1)
    assert abs(b - true_b) < 0.1


def test_fit_logistic_matches_scikit_learn() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    y = rng.random(300) < 1 / (1 + np.exp(-(x[:, 0] - x[:, 2])))
    w, b = fit_logistic(x, y, l2=2.0)
    # sklearn minimizes ½|w|² + C Σ loss; ours Σ loss + l2/2 |w|² (unit weights): C = 1/l2.
    ref = sklearn.LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(x, y)
    # Both solve the same strictly convex problem to tolerance ≪ 1e-6; 1e-5 absorbs lbfgs' stopping.
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-5)
    assert abs(b - float(ref.intercept_[0])) < 1e-5


def test_fit_logistic_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="l2 must be positive"):
        fit_logistic(np.zeros((3, 1)), np.array([0, 1, 0]), l2=0)
    with pytest.raises(ValueError, match="as many labels"):
        fit_logistic(np.zeros((3, 1)), np.array([0, 1]))


def test_fit_score_head_learns_that_large_nuclei_are_abnormal() -> None:
    rng = np.random.default_rng(2)
    n = 4000
    abnormal = rng.random(n) < 0.3
    area = np.where(abnormal, rng.lognormal(np.log(120), 0.3, n), rng.lognormal(np.log(40), 0.3, n))
    cnn = np.clip(np.where(abnormal, 0.6, 0.4) + rng.normal(0, 0.25, n), 0.01, 0.99)  # a weak CNN
    morph = {"nucleus_area_um2": area.astype(np.float32), "nucleus_mean_od": rng.random(n).astype(np.float32)}
    head = fit_score_head(
        cnn, morph, abnormal, features=["nucleus_area_um2", "nucleus_mean_od"], transforms=["log", "identity"]
    )
    assert head.coef[0] > 1.0 and abs(head.coef[1]) < 0.3 and head.coef_score > 0
    refit = head.abnormal_probability(cnn, morph)
    # The simulated areas separate the classes by 1.1 / 0.3 ≈ 3.7 standard deviations: the refitted
    # score ranks far better than the weak CNN alone.
    assert _auroc(refit, abnormal) > 0.97 > 0.85 > _auroc(cnn, abnormal)


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    n_pos = int(positive.sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(score) - n_pos)))


# -- applying a head -----------------------------------------------------------------------------------


def test_apply_replaces_the_abnormal_mass_and_keeps_the_proportions() -> None:
    head = _head()
    probs = np.array([[0.5, 0.1, 0.3, 0.1], [0.05, 0.0, 0.0, 0.95], [0.0, 0.7, 0.3, 0.0]], np.float32)
    morph = {
        "nucleus_area_um2": np.array([40.0, 150.0, 20.0], np.float32),
        "nucleus_circularity": np.array([0.8, 0.6, 0.9], np.float32),
    }
    out = head.apply(probs, [1, 2], morph)
    q = head.abnormal_probability(probs[:, [1, 2]].sum(axis=1), morph)
    np.testing.assert_allclose(out[:, [1, 2]].sum(axis=1), q, rtol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    # Within each group the proportions stay (row 0: LSIL:HSIL 1:3, NILM:artifact 5:1).
    assert out[0, 2] == pytest.approx(3 * out[0, 1], rel=1e-5)
    assert out[0, 0] == pytest.approx(5 * out[0, 3], rel=1e-5)
    # A group with no mass shares its new mass equally (row 1 had no LSIL/HSIL probability).
    assert out[1, 1] == pytest.approx(out[1, 2], rel=1e-6) and out[1, 1] > 0
    # The row at the centre with CNN score 0.4 gets sigmoid(-0.3 + 1.5 logit(0.4)).
    z = -0.3 + 1.5 * np.log(0.4 / 0.6)
    assert float(q[0]) == pytest.approx(1 / (1 + np.exp(-z)), rel=1e-6)
    # A larger nucleus raises the score (coef 2 on log area), other things equal.
    big = head.abnormal_probability(
        np.array([0.4, 0.4]),
        {
            "nucleus_area_um2": np.array([40.0, 80.0]),
            "nucleus_circularity": np.array([0.8, 0.8]),
        },
    )
    assert big[1] > big[0]


def test_missing_measurements_count_as_a_typical_cell() -> None:
    head = _head()
    score = np.array([0.3, 0.3, 0.3, 0.3])
    morph = {
        "nucleus_area_um2": np.array([np.nan, 0.0, -1.0, 40.0]),  # NaN, and ≤ 0 under log, are missing
        "nucleus_circularity": np.array([0.8, np.nan, 0.8, 0.8]),
    }
    q = head.abnormal_probability(score, morph)
    np.testing.assert_allclose(q, q[3], rtol=1e-12)


def test_a_head_round_trips_and_refuses_what_it_cannot_use() -> None:
    head = _head()
    assert ScoreHead.from_dict(json.loads(json.dumps(head.to_dict()))) == head
    with pytest.raises(ValueError, match="unknown morphometric"):
        _head(features=("nucleus_area_um2", "colour"))
    with pytest.raises(ValueError, match="unknown transform"):
        _head(transforms=("log", "sqrt"))
    with pytest.raises(ValueError, match="scale must be positive"):
        _head(scale=(0.5, 0.0))
    with pytest.raises(ValueError, match="coef has 1 entries"):
        _head(coef=(1.0,))
    with pytest.raises(ValueError, match="missing keys"):
        ScoreHead.from_dict({"features": ["nucleus_area_um2"]})
    with pytest.raises(KeyError, match="nucleus_circularity"):
        head.abnormal_probability(np.array([0.5]), {"nucleus_area_um2": np.array([40.0])})


# -- a bundle with a head, in the classifier and the device stage ---------------------------------------


def _bundle(tmp_path: Path, name: str, head: ScoreHead | None, *, extra: list[str] | None = None) -> Any:
    return tiny_classifier_bundle(
        tmp_path / name,
        CLASSES,
        ABNORMAL,
        inference={"score_head": head.to_dict()} if head is not None else {},
        extra_features=extra if extra is not None else (list(head.features) if head is not None else []),
    )


def test_classifier_applies_the_head_to_the_cnn_probabilities(tmp_path: Path) -> None:
    head = _head()
    plain = CellClassifier([_bundle(tmp_path, "plain", None)], device=CPU)
    with_head = CellClassifier([_bundle(tmp_path, "head", head)], device=CPU, batch_size=2)
    assert plain.morphometrics == () and with_head.morphometrics == head.features
    crops = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8))
    morph = {
        "nucleus_area_um2": np.array([10.0, 40.0, 90.0, np.nan, 300.0], np.float32),
        "nucleus_circularity": np.array([0.9, 0.8, 0.7, 0.8, 0.5], np.float32),
    }
    want = head.apply(plain.predict(crops).numpy(), [1, 2], morph)
    got = with_head.predict(crops, morphometrics=morph).numpy()
    # Same weights, same crops, same kernels (batches of 2 against one of 5 change MKL's blocking:
    # float32 softmax outputs agree to a few ulps, and the head's logistic map has slope ≤ 1/4 ×
    # |coef_score| / (p(1 − p)), which stays below 1e2 for these probabilities).
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="needs the cells' morphometrics nucleus_area_um2"):
        with_head.predict(crops)


def test_a_bundle_whose_head_and_extra_features_disagree_is_refused(tmp_path: Path) -> None:
    bad = _bundle(tmp_path, "bad", _head(), extra=["nucleus_area_um2"])
    with pytest.raises(BundleError, match="extra_features lists"):
        score_head_of(bad)
    broken = _bundle(tmp_path, "broken", None)
    cfg = broken.config.model_copy(update={"inference": {"score_head": {"features": []}}})
    broken.config = cfg
    with pytest.raises(BundleError, match=r"invalid inference\.score_head"):
        CellClassifier([broken], device=CPU)


def test_evaluating_a_head_bundle_on_bare_crops_is_refused(tmp_path: Path) -> None:
    from wsi_screen.train.classifier import evaluate_bundles
    from wsi_screen.train.data import CropSet

    bundle = _bundle(tmp_path, "head", _head())
    data = CropSet(
        crops=np.zeros((2, 64, 64, 3), np.uint8),
        labels=np.array([0, 1]),
        groups=np.array(["a", "b"]),
        class_names=["NILM", "LSIL"],
        mpp=0.25,
        sources=np.array(["s", "s"]),
    )
    with pytest.raises(DataError, match="needs the localizer's nucleus measurements"):
        evaluate_bundles([bundle.path], data)


class _SizedLocalizer(ThresholdLocalizer):
    """:class:`ThresholdLocalizer` whose nuclei have an area that grows with x (and a circularity)."""

    def localize(self, windows: torch.Tensor, *, window_mpp: float, halo_px: int) -> list[CellTable]:
        out = []
        for t in super().localize(windows, window_mpp=window_mpp, halo_px=halo_px):
            morph = {m: np.zeros(len(t), np.float32) for m in MORPHOMETRICS}
            morph["nucleus_area_um2"] = (10.0 + t.x / 4.0).astype(np.float32)
            morph["nucleus_circularity"] = np.full(len(t), 0.75, np.float32)
            out.append(
                CellTable(
                    x=t.x,
                    y=t.y,
                    tile=t.tile,
                    detection_score=t.detection_score,
                    morphometrics=morph,
                    outline_offsets=t.outline_offsets,
                    outline_xy=t.outline_xy,
                    frame=t.frame,
                )
            )
        return out


def test_the_device_stage_feeds_each_cells_morphometrics_to_the_head(tmp_path: Path) -> None:
    from wsi_screen.device_stage import TileProcessor
    from wsi_screen.tiling import make_grid

    head = _head()
    grid = make_grid((512, 512), slide_mpp=0.25, mpp=0.25, tile_size=512, halo_um=16.0)
    window = np.full((grid.read_size, grid.read_size, 3), 235, np.uint8)
    rng = np.random.default_rng(4)
    for cx, cy in rng.integers(60, grid.read_size - 60, (6, 2)).tolist():
        window[cy - 6 : cy + 6, cx - 6 : cx + 6] = (60, 40, 90)  # dark nuclei
    tile = next(grid.tiles())

    def screen(bundle: Any) -> CellTable:
        proc = TileProcessor(
            localizer=_SizedLocalizer(),  # type: ignore[arg-type]
            classifier=CellClassifier([bundle], device=CPU),
            grid=grid,
            source=None,
            target=None,
            crop_size=64,
            device=CPU,
        )
        return proc([tile], [window]).tables[0]

    plain = screen(_bundle(tmp_path, "plain", None))
    refit = screen(_bundle(tmp_path, "head", head))
    assert len(plain) >= 4 and np.array_equal(plain.x, refit.x)
    morph = {f: plain.morphometrics[f] for f in head.features}
    want = head.abnormal_probability(abnormality_score(plain.probs, CLASSES, ABNORMAL), morph)
    got = abnormality_score(refit.probs, CLASSES, ABNORMAL)
    # Same weights and batch: identical CNN probabilities; float32 storage of the refit (≤ 6e-8).
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.ptp(got) > 0.05  # the areas differ, so do the refitted scores


def _with_head(bundle: Any, head: ScoreHead, dest: Path) -> Any:
    """The bundle's weights file with a head added to its config."""
    import shutil

    shutil.copytree(bundle.path, dest)
    cfg = json.loads((dest / "bundle.json").read_text())
    cfg["inference"] = {"score_head": head.to_dict()}
    cfg["extra_features"] = list(head.features)
    (dest / "bundle.json").write_text(json.dumps(cfg))
    return load_bundle(dest)


def test_a_head_changes_the_models_identity_but_not_the_weights_check(tmp_path: Path) -> None:
    plain = _bundle(tmp_path, "plain", None)
    one = _with_head(plain, _head(), tmp_path / "one")
    other = _with_head(plain, _head(intercept=0.4), tmp_path / "other")
    # The same weights file: its sha256 is checked and agrees, and names a bundle without a head.
    assert plain.sha256 == one.sha256 == other.sha256 == plain.identity_sha256
    # What run.json, cells.zarr and operating points record differs with the head.
    assert len({plain.identity_sha256, one.identity_sha256, other.identity_sha256}) == 3
    assert load_bundle(one.path).identity_sha256 == one.identity_sha256  # and is stable
