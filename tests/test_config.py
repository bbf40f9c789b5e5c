"""Settings: presets, YAML files, overrides and their one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from wsi_screen.config import Settings, list_presets, load_settings, parse_override
from wsi_screen.errors import ConfigError


def test_presets_exist_and_validate() -> None:
    names = list_presets()
    assert {"default", "lbc", "conventional"} <= set(names)
    for name in names:
        settings = load_settings(name)
        assert settings.preset == name


def test_default_preset_equals_code_defaults() -> None:
    assert load_settings().to_dict() == Settings().to_dict() | {"preset": "default"}


def test_preparation_presets_set_bethesda_thresholds() -> None:
    assert load_settings("lbc").adequacy.min_squamous_cells == 5000
    conventional = load_settings("conventional")
    assert conventional.adequacy.preparation == "conventional"
    assert conventional.adequacy.min_squamous_cells == 8000


def test_yaml_file_and_overrides_layer(tmp_path: Path) -> None:
    cfg = tmp_path / "lab.yaml"
    cfg.write_text("preset: conventional\ntriage:\n  confidence: 0.8\nruntime:\n  device: cpu\n")
    s = load_settings(config=cfg, overrides={"triage.confidence": 0.9, "classification.models": ["a", "b"]})
    assert s.adequacy.min_squamous_cells == 8000  # from the preset the file names
    assert s.triage.confidence == 0.9  # override beats the file
    assert s.runtime.device == "cpu"
    assert s.classification.models == ["a", "b"]


def test_old_runtime_seed_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``runtime.seed`` was removed (nothing read it); files and overrides that set it still load."""
    old = tmp_path / "old.yaml"
    old.write_text("runtime:\n  device: cpu\n  seed: 3\n")
    with caplog.at_level(logging.WARNING, logger="wsi_screen.config"):
        s = load_settings(config=old)
    assert s.runtime.device == "cpu"
    assert "seed" not in s.to_dict()["runtime"]
    assert s.to_dict() == load_settings(overrides={"runtime.device": "cpu"}).to_dict()
    assert any("runtime.seed is ignored" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsi_screen.config"):
        s = load_settings(overrides={"runtime.seed": 5})
    assert "seed" not in s.to_dict()["runtime"]
    assert any("will be refused" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsi_screen.config"):
        load_settings()
    assert not caplog.records
    with pytest.raises(ConfigError, match=r"unknown setting 'runtime\.sed'"):
        load_settings(overrides={"runtime.sed": 5})


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"triage.confidnce": 0.5}, "unknown setting 'triage.confidnce'"),
        ({"tiling.halo_um": -1}, "tiling.halo_um = -1"),
        ({"runtime.device": "tpu"}, "runtime.device = 'tpu'"),
        ({"nosection.key": 1}, "no section 'nosection'"),
        ({"localization.min_nucleus_area_um2": 500}, "must exceed"),
    ],
)
def test_bad_values_name_key_and_value(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(config=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("triage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config=bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(config=scalar)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_settings("no-such-preset")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("triage: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_settings(config=evil)


def test_parse_override() -> None:
    assert parse_override("triage.confidence=0.8") == ("triage.confidence", 0.8)
    assert parse_override("output.report=false") == ("output.report", False)
    assert parse_override("classification.models=[a, b]") == ("classification.models", ["a", "b"])
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("triage.confidence")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override(".x=1")
