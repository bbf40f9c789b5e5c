"""A crop folder with a non-class sub-folder (``masks/``): a clear error, ``--ignore GLOB`` or a
class map entry ``masks: null`` skips it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_screen.cli.main import main
from wsi_screen.train.data import DataError, load_class_map, load_crop_folder

SIDE = 48


def _disc(diameter: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    inside = (xx + 0.5 - SIDE / 2) ** 2 + (yy + 0.5 - SIDE / 2) ** 2 <= (diameter / 2) ** 2
    img = np.empty((SIDE, SIDE, 3), np.uint8)
    img[:] = (240, 238, 242)
    img[inside] = (90, 60, 140)
    return np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def crops_with_masks(tmp_path: Path) -> Path:
    """NILM and HSIL folders (4 crops each) and a ``masks/`` folder of binary masks next to them."""
    root = tmp_path / "crops"
    for cls, diam in (("NILM", 8.0), ("HSIL", 22.0)):
        (root / cls).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(_disc(diam, k)).save(root / cls / f"{cls}-{k}.png")
    (root / "masks").mkdir()
    for k in range(3):
        Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(root / "masks" / f"m{k}.png")
    return root


def _load(root: Path, **kw: object) -> object:
    return load_crop_folder(root, mpp=0.25, size=64, progress=False, **kw)  # type: ignore[arg-type]


def _assert_names_masks(message: str) -> None:
    assert "\n" not in message
    assert "folder 'masks'" in message and "unknown class 'masks'" in message
    assert "add masks to ignore" in message and "masks: null" in message


def test_unknown_folder_error_names_it_and_both_ways_to_skip(crops_with_masks: Path) -> None:
    with pytest.raises(DataError) as err:
        _load(crops_with_masks)
    _assert_names_masks(str(err.value))
    with pytest.raises(DataError) as err:  # a class map without the folder: the same hint
        _load(crops_with_masks, class_map={"NILM": "NILM", "HSIL": "HSIL"})
    _assert_names_masks(str(err.value))
    assert "the class map knows NILM, HSIL" in str(err.value)


@pytest.mark.parametrize("pattern", ["masks", "MASKS", "mask*", "m?sks"])
def test_ignore_skips_the_folder(crops_with_masks: Path, pattern: str) -> None:
    cs = load_crop_folder(crops_with_masks, mpp=0.25, size=64, progress=False, ignore=[pattern])
    assert cs.class_counts() == {"NILM": 4, "HSIL": 4}
    assert cs.info["ignored"] == ["masks"] and cs.info["folders"] == {"NILM": 4, "HSIL": 4}
    assert not any("masks" in s for s in cs.sources.tolist())


def test_ignore_applies_inside_class_folders(crops_with_masks: Path) -> None:
    nested = crops_with_masks / "HSIL" / "masks"
    nested.mkdir()
    Image.fromarray(_disc(22.0, 9)).save(nested / "inner.png")
    cs = load_crop_folder(crops_with_masks, mpp=0.25, size=64, progress=False, ignore=["masks", "other"])
    assert cs.class_counts() == {"NILM": 4, "HSIL": 4}
    assert cs.info["ignored"] == ["HSIL/masks", "masks"]


def test_null_in_a_class_map_skips_the_folder(crops_with_masks: Path, tmp_path: Path) -> None:
    cs = load_crop_folder(
        crops_with_masks,
        mpp=0.25,
        size=64,
        progress=False,
        class_map={"NILM": "NILM", "HSIL": "HSIL", "masks": None},
    )
    assert cs.class_counts() == {"NILM": 4, "HSIL": 4}
    cmap = tmp_path / "map.yaml"
    cmap.write_text("NILM: NILM\nHSIL: HSIL\nmasks: null\n")
    assert load_class_map(cmap)["masks"] is None
    cs = load_crop_folder(crops_with_masks, mpp=0.25, size=64, progress=False, class_map=str(cmap))
    assert len(cs) == 8


# -- the commands ----------------------------------------------------------------------------------


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def _one_line_error(err: str) -> str:
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


_TRAIN = [
    "--mpp", "0.25", "--input-size", "64", "--arch", "mobilenetv3_small_050", "--batch-size", "8",
    "--epochs", "1", "--val-fraction", "0.25", "--test-fraction", "0", "-q",
]  # fmt: skip


def test_train_classifier_names_the_folder(
    crops_with_masks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    code, _, err = _main(
        ["train", "classifier", "--data", str(crops_with_masks), "-o", str(out), *_TRAIN], capsys
    )
    assert code == 1
    _assert_names_masks(_one_line_error(err))
    assert not out.exists()


@pytest.mark.slow
def test_train_classifier_with_ignore(
    crops_with_masks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    args = ["train", "classifier", "--data", str(crops_with_masks), "-o", str(out), "--ignore", "masks"]
    code, _, err = _main([*args, *_TRAIN], capsys)
    assert code == 0, err
    assert "8 crops" in err and (out / "bundle.json").is_file()


@pytest.mark.slow
def test_train_classifier_strong_augment_is_recorded(
    crops_with_masks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--strong-augment trains with AugmentConfig.strong() (JPEG on) and the bundle's recipe says so."""
    from wsi_screen.train.augment import AugmentConfig

    out = tmp_path / "bundle"
    args = ["train", "classifier", "--data", str(crops_with_masks), "-o", str(out), "--ignore", "masks"]
    code, _, err = _main([*args, "--no-augment", "--strong-augment", *_TRAIN], capsys)
    assert code == 2 and "contradict" in err and not out.exists()
    code, _, err = _main([*args, "--strong-augment", "--hed-jitter", "0.2", *_TRAIN], capsys)
    assert code == 0, err
    recipe = json.loads((out / "bundle.json").read_text())["training"]["recipe"]["augment"]
    assert recipe == {**AugmentConfig.strong().to_dict(), "hed": 0.2}


def test_evaluate_names_the_folder_and_honours_ignore_and_null(
    crops_with_masks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "evaluate",
        "--model",
        "cyto-synth-v1",
        "--data",
        str(crops_with_masks),
        "--mpp",
        "0.25",
        "--cut",
        "crop",
    ]
    code, _, err = _main([*base, "--device", "cpu", "-q"], capsys)
    assert code == 1
    _assert_names_masks(_one_line_error(err))
    code, out, err = _main([*base, "--ignore", "masks", "--device", "cpu", "--json", "-q"], capsys)
    assert code == 0, err
    m = json.loads(out)
    assert m["n"] == 8 and m["class_names"] == ["NILM", "HSIL"]
    cmap = tmp_path / "map.yaml"
    cmap.write_text("NILM: NILM\nHSIL: HSIL\nmasks: null\n")
    code, out, err = _main([*base, "--class-map", str(cmap), "--device", "cpu", "--json", "-q"], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 8
