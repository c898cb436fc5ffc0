"""Training/config.py: files and flags combine (flags win), the effective config is saved; the
shipped example configs load into the verbs' config classes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from Training import config as config_mod


@dataclass(frozen=True)
class _Example:
    name: str = field(default="a", metadata={"help": "a name"})
    steps: int = field(default=1, metadata={"help": "steps"})
    rate: float = 0.5
    flag: bool = False
    items: tuple[str, ...] = ()
    path: Path | None = None


def test_file_and_flag_combine_with_flag_winning(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("name: from_file\nsteps: 7\nflag: true\nitems: [x, y]\n")
    config = config_mod.parse(_Example, ["--config", str(file), "--steps", "9"], "test")
    assert config == _Example(name="from_file", steps=9, rate=0.5, flag=True, items=("x", "y"))
    config = config_mod.parse(_Example, ["--config", str(file), "--no-flag", "--items", "p", "--items", "q,r"], "t")
    assert config.flag is False and config.items == ("p", "q", "r") and config.steps == 7
    assert config_mod.parse(_Example, ["--path", "none"], "t").path is None


def test_effective_config_saved_and_errors(tmp_path: Path) -> None:
    config = config_mod.parse(_Example, ["--rate", "0.25", "--path", "x/y"], "test")
    saved = config_mod.save(config, tmp_path / "out" / "effective.json")
    assert json.loads(saved.read_text()) == {"name": "a", "steps": 1, "rate": 0.25, "flag": False, "items": [],
                                             "path": "x/y"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(config_mod.ConfigError, match="unknown field"):
        config_mod.parse(_Example, ["--config", str(bad)], "test")
    with pytest.raises(config_mod.ConfigError, match="steps"):
        config_mod.parse(_Example, ["--steps", "many"], "test")


def test_verb_saves_effective_config_next_to_outputs(tmp_path: Path) -> None:
    from Training.clinical import clinical_data

    theirs = tmp_path / "t.csv"
    theirs.write_text("case_id,age\nA,70\n")
    file = tmp_path / "clinical.yaml"
    file.write_text(f"from_csv: {theirs}\nseed: 3\n")
    out = tmp_path / "clinical.csv"
    clinical_data.main(["--config", str(file), "--output", str(out), "--seed", "4"])
    saved = json.loads((tmp_path / "clinical_config.json").read_text())
    assert saved["seed"] == 4 and saved["from_csv"] == str(theirs) and saved["output"] == str(out)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "Training"
                                                         / "configs").glob("*.yaml")))
def test_shipped_configs_load(name: str, repo_root: Path) -> None:
    path = repo_root / "Training" / "configs" / name
    values = config_mod.load_file(path)
    if name.startswith("train_"):
        from Training.training.train import TrainConfig

        config = config_mod.build(TrainConfig, values, source=str(path))
        assert config.device in ("cpu", "cuda") and str(config.cache) == values["cache"]
    else:
        from Training.evaluation.evaluate import EvaluateConfig

        config = config_mod.build(EvaluateConfig, values, source=str(path))
        assert len(config.data) == len(config.label) == 3


def test_prefix_abbreviations_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``--ste 3`` must not silently mean ``--steps 3`` (argparse's allow_abbrev)."""
    with pytest.raises(SystemExit) as exit_info:
        config_mod.parse(_Example, ["--ste", "3"], "test")
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --ste" in capsys.readouterr().err
    assert config_mod.parse(_Example, ["--steps", "3"], "test").steps == 3


def test_parse_given_names_typed_fields(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("name: from_file\n")
    config, given = config_mod.parse_given(_Example, ["--config", str(file), "--rate", "0.5"], "test")
    assert config.rate == 0.5 and given == {"name", "rate"}


def test_fit_nihss_refuses_abbreviated_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from Training.clinical import fit_nihss

    with pytest.raises(SystemExit) as stop:
        fit_nihss.main(["--so", "somewhere"])  # a prefix of --soop
    assert stop.value.code == 2
    assert "unrecognized arguments: --so" in capsys.readouterr().err
