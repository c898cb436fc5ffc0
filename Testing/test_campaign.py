"""The training campaign: the fixed shipping rule, the ledger and card, and the stages' orchestration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inference_phantom import write_tiny_bundle

from Training import campaign
from Training import config as cfg
from Training.campaign import CampaignConfig, decide
from Training.evaluation.postprocess import SEARCH_GRID_FIELDS, PostprocessConfig


def _result(score: float, dice: float, small_f1: float | None, plausible: bool = True,
            degenerate: list | None = None, chosen_small_f1: float | None = None) -> dict:
    """A search result whose rule-4 reference (settings keeping small components) has ``small_f1``;
    its chosen setting's own small-lesion F1 is ``chosen_small_f1`` (default: the same)."""
    chosen = small_f1 if chosen_small_f1 is None else chosen_small_f1
    return {"best": {"score": score, "mean_dice": dice, "small_lesion_f1": chosen, "threshold": 0.5,
                     "plausible": plausible, "min_component_ml": 0.0},
            "keeps_small": {"score": score, "small_lesion_f1": small_f1, "min_component_ml": 0.0},
            "degenerate": degenerate or []}


SHIPPED = _result(0.50, 0.45, 0.30)
GUARD = Path(__file__).parents[1] / "Training" / "resources" / "postprocess_guard_issue_time.json"


@pytest.mark.parametrize(("candidate", "ship", "failed"), [
    (_result(0.52, 0.45, 0.30), True, None),
    (_result(0.505, 0.50, 0.40), False, "score"),  # +0.005 is not enough
    (_result(0.60, 0.43, 0.40), False, "mean_dice"),  # counts bought with overlap
    (_result(0.60, 0.50, 0.27), False, "small_lesion_f1"),  # small lesions lost
    (_result(0.60, 0.50, None), False, "small_lesion_f1"),  # and none found at all
    (_result(0.60, 0.50, 0.40, plausible=False), False, "plausible"),
    (_result(0.60, 0.50, 0.40, degenerate=["empty"]), False, "plausible"),
])
def test_rule(candidate: dict, ship: bool, failed: str | None) -> None:
    decision = decide(candidate, SHIPPED)
    assert decision["ship"] is ship
    assert [k for k, ok in decision["checks"].items() if not ok] == ([failed] if failed else [])


def test_no_small_lesions_in_the_sets_is_no_obstacle() -> None:
    assert decide(_result(0.52, 0.45, float("nan")), _result(0.50, 0.45, float("nan")))["ship"]


def test_small_lesions_are_compared_at_settings_that_keep_them_not_at_each_chosen_size_limit() -> None:
    # the shipped bundle's chosen 1 mL limit "finds" small lesions by covering them with large components
    shipped = _result(0.50, 0.45, 0.10, chosen_small_f1=0.30)
    finds_more = _result(0.52, 0.45, 0.15, chosen_small_f1=0.15)
    decision = decide(finds_more, shipped)
    assert decision["ship"] and decision["candidate"]["small_lesion_f1_keeping_small"] == 0.15
    assert decision["shipped"]["small_lesion_f1"] == 0.30  # the chosen settings' values are still reported
    finds_fewer = _result(0.52, 0.45, 0.07, chosen_small_f1=0.40)
    assert decide(finds_fewer, shipped)["checks"]["small_lesion_f1"] is False
    no_reference = {**_result(0.52, 0.45, 0.15), "keeps_small": None}  # no setting keeps them: none found
    assert decide(no_reference, shipped)["checks"]["small_lesion_f1"] is False


def test_a_search_without_the_small_lesion_reference_is_refused() -> None:
    old = _result(0.52, 0.45, 0.3)
    del old["keeps_small"]
    with pytest.raises(cfg.ConfigError, match="search it again"):
        decide(old, SHIPPED)


def _models(tmp_path: Path) -> Path:
    bundle = tmp_path / "Models" / "acute"
    bundle.mkdir(parents=True)
    (bundle / "model.json").write_text('{"old": true}')
    (bundle / "weights.safetensors").write_bytes(b"old")
    (bundle / "README.md").write_text("# card\n\ntext\n")
    return tmp_path / "Models"


def _fake_verbs(monkeypatch: pytest.MonkeyPatch, scores: dict[str, float], calls: list) -> None:
    def fake(module: str, argv: list) -> None:
        argv = [str(a) for a in argv]
        calls.append(module)
        out = Path(argv[argv.index("--out") + 1])
        if module == "Training.training.train_synth":
            (out / "acute" / "checkpoints").mkdir(parents=True)
            device = argv[argv.index("--device") + 1]
            (out / "acute" / "train_synth_config.json").write_text(json.dumps(
                {"device": device, "lr": float(argv[argv.index("--lr") + 1]), "batch_size": 8, "patch": []}
                if device == "cuda" else {"device": device}))
            (out / "summary.json").write_text(json.dumps({"acute": {"steps": 1200, "seconds": 3600.0,
                                                                    "best_val_dice": 0.6}}))
        elif module == "Training.training.export":
            out.mkdir(parents=True)
            (out / "model.json").write_text('{"new": true}')
            (out / "weights.safetensors").write_bytes(b"new")
        elif module == "Training.evaluation.postprocess":
            out.mkdir(parents=True)
            name = "candidate" if Path(argv[argv.index("--bundle") + 1]).name == "candidate" else "shipped"
            (out / "postprocess.json").write_text(json.dumps(_result(scores[name], 0.5, 0.3)))
    monkeypatch.setattr(campaign, "_run_verb", fake)


def test_a_winning_run_ships_records_and_resumes_without_redoing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    models = _models(tmp_path)
    (tmp_path / "val").mkdir()
    calls: list = []
    _fake_verbs(monkeypatch, {"candidate": 0.6, "shipped": 0.5}, calls)
    config = CampaignConfig(pack=tmp_path / "pack.npz", val=(tmp_path / "val",), out=tmp_path / "runs" / "run1",
                            models=models, ship=True)
    result = campaign.run(config)
    assert result["outcome"] == "shipped"
    assert (models / "acute" / "weights.safetensors").read_bytes() == b"new"
    assert calls == ["Training.training.train_synth", "Training.training.export",
                     "Training.evaluation.postprocess", "Training.evaluation.postprocess"]
    ledger = json.loads((models / "acute" / "campaign.json").read_text())
    assert [r["run"] for r in ledger["runs"]] == ["run1"] and ledger["cumulative"]["cpu_training_s"] == 3600.0
    card = (models / "acute" / "README.md").read_text()
    assert "| run1 |" in card and "1.00 h of CPU training" in card and card.startswith("# card")

    calls.clear()
    campaign.run(config)  # every stage is there already: nothing runs again, the ledger keeps one row
    assert calls == []
    assert len(json.loads((models / "acute" / "campaign.json").read_text())["runs"]) == 1
    assert (models / "acute" / "README.md").read_text().count("### Training campaign") == 1


def test_a_losing_run_keeps_the_bundle_but_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = _models(tmp_path)
    (tmp_path / "val").mkdir()
    _fake_verbs(monkeypatch, {"candidate": 0.505, "shipped": 0.5}, [])
    config = CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "run2", models=models,
                            ship=True)
    assert campaign.run(config)["outcome"] == "kept"
    assert (models / "acute" / "weights.safetensors").read_bytes() == b"old"
    assert json.loads((tmp_path / "run2" / "decision.json").read_text())["checks"]["score"] is False
    assert json.loads((models / "acute" / "campaign.json").read_text())["runs"][0]["outcome"] == "kept"


@pytest.mark.parametrize("recipe, expected", [
    ({}, {"--patch": "64,64,64", "--batch-size": "2", "--val-every": "300", "--lesion-loss": "0.0",
          "--patience": "0", "--focus-fraction": "0.0", "--grid-noise": "0.0,0.0", "--pool-pause": "6.0"}),
    ({"patch": "80,112,96", "batch_size": 1, "val_every": 200, "lesion_loss": 0.5, "patience": 4,
      "focus_fraction": 0.5, "grid_noise": (0.05, 0.11), "pool_pause": 0.0},
     {"--patch": "80,112,96", "--batch-size": "1", "--val-every": "200", "--lesion-loss": "0.5",
      "--patience": "4", "--focus-fraction": "0.5", "--grid-noise": "0.05,0.11", "--pool-pause": "0.0"}),
])
def test_the_training_recipe_reaches_train_synth_and_the_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                recipe: dict, expected: dict) -> None:
    models = _models(tmp_path)
    (tmp_path / "val").mkdir()
    seen: dict = {}
    _fake_verbs(monkeypatch, {"candidate": 0.5, "shipped": 0.5}, [])
    fake = campaign._run_verb

    def spy(module: str, argv: list) -> None:
        if module == "Training.training.train_synth":
            seen["argv"] = [str(a) for a in argv]
        fake(module, argv)
    monkeypatch.setattr(campaign, "_run_verb", spy)
    config = CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "run", models=models,
                            **recipe)
    campaign.run(config)
    argv = seen["argv"]
    assert {flag: argv[argv.index(flag) + 1] for flag in expected} == expected
    entry = json.loads((models / "acute" / "campaign.json").read_text())["runs"][0]
    assert (entry["patch"], str(entry["batch_size"]), str(entry["lesion_loss"]), str(entry["patience"]),
            str(entry["focus_fraction"])) == (expected["--patch"], expected["--batch-size"], expected["--lesion-loss"],
                                              expected["--patience"], expected["--focus-fraction"])
    assert ",".join(str(v) for v in entry["grid_noise"]) == expected["--grid-noise"]
    assert str(entry["pool_pause"]) == expected["--pool-pause"]


def test_a_run_can_start_from_an_earlier_candidate_and_is_still_judged_against_the_shipped_bundle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = _models(tmp_path)
    (tmp_path / "val").mkdir()
    earlier = write_tiny_bundle(tmp_path / "earlier", seed=1)
    seen: dict = {}
    _fake_verbs(monkeypatch, {"candidate": 0.5, "shipped": 0.5}, [])
    fake = campaign._run_verb

    def spy(module: str, argv: list) -> None:
        seen.setdefault(module, [str(a) for a in argv])
        fake(module, argv)
    monkeypatch.setattr(campaign, "_run_verb", spy)
    out = tmp_path / "run"
    campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=out, models=models,
                                init=earlier))
    argv = seen["Training.training.train_synth"]
    init = Path(argv[argv.index("--init") + 1])
    assert init == out / "init"
    assert (init / "acute" / "weights.safetensors").read_bytes() == (earlier / "weights.safetensors").read_bytes()
    search = seen["Training.evaluation.postprocess"]  # the candidate's; the shipped copy is searched next
    assert (out / "shipped" / "weights.safetensors").read_bytes() == b"old"
    assert Path(search[search.index("--bundle") + 1]) == out / "candidate"
    assert json.loads((models / "acute" / "campaign.json").read_text())["runs"][0]["init"] == str(earlier)
    meta = json.loads((earlier / "model.json").read_text())
    (earlier / "model.json").write_text(json.dumps({**meta, "task": "outcome"}))
    with pytest.raises(cfg.ConfigError, match="--init: .* task 'outcome', not 'acute'"):
        campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "r2",
                                    models=models, init=earlier))
    with pytest.raises(cfg.ConfigError, match="--init: .* is not a bundle"):
        campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "r3",
                                    models=models, init=tmp_path / "val"))


def test_a_run_trained_elsewhere_with_until_export_continues_at_the_search(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = _models(tmp_path)
    calls: list = []
    _fake_verbs(monkeypatch, {"candidate": 0.6, "shipped": 0.5}, calls)
    out = tmp_path / "gpu1"
    # on the lent GPU: no validation sets there
    stopped = campaign.run(CampaignConfig(pack=tmp_path / "p.npz", out=out, models=models, device="cuda", lr=1e-4,
                                          until="export", workers=14))
    assert stopped["stopped_after"] == "export" and (out / "candidate" / "model.json").is_file()
    assert calls == ["Training.training.train_synth", "Training.training.export"]
    assert not (models / "acute" / "campaign.json").exists()
    # later, on the machine with the sets, the command without the training flags continues at the search
    (tmp_path / "val").mkdir()
    calls.clear()
    result = campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=out, models=models,
                                         ship=True))
    assert calls == ["Training.evaluation.postprocess", "Training.evaluation.postprocess"]
    assert result["outcome"] == "shipped"
    entry = json.loads((models / "acute" / "campaign.json").read_text())["runs"][0]
    assert (entry["device"], entry["lr"], entry["batch_size"], entry["patch"]) == ("cuda", 1e-4, 8, "whole volume")
    assert json.loads((models / "acute" / "campaign.json").read_text())["cumulative"]["gpu_training_s"] == 3600.0


def test_a_ready_made_candidate_is_judged_by_the_same_rule_without_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = _models(tmp_path)
    (tmp_path / "val").mkdir()
    soup = write_tiny_bundle(tmp_path / "soup", seed=2)
    calls: list = []
    _fake_verbs(monkeypatch, {"candidate": 0.6, "shipped": 0.5}, calls)
    out = tmp_path / "soup1"
    result = campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=out, models=models,
                                         candidate=soup, ship=True))
    assert calls == ["Training.evaluation.postprocess", "Training.evaluation.postprocess"]  # no training, no export
    assert result["outcome"] == "shipped"
    assert (models / "acute" / "weights.safetensors").read_bytes() == (soup / "weights.safetensors").read_bytes()
    entry = json.loads((models / "acute" / "campaign.json").read_text())["runs"][0]
    assert (entry["candidate"], entry["steps"], entry["training_s"]) == (str(soup), 0, 0.0)
    assert "lr" not in entry and "device" not in entry  # no training settings for a run that trained nothing
    with pytest.raises(cfg.ConfigError, match="--candidate is judged, not trained"):
        campaign.run(CampaignConfig(pack=tmp_path / "p.npz", out=tmp_path / "r2", models=models, candidate=soup,
                                    until="export"))
    with pytest.raises(cfg.ConfigError, match="--candidate: .* is not a bundle"):
        campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "r3",
                                    models=models, candidate=tmp_path / "val"))


def test_the_gpu_recipe_passes_its_workers_and_validation_size(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    _fake_verbs(monkeypatch, {}, [])
    fake = campaign._run_verb

    def spy(module: str, argv: list) -> None:
        seen.setdefault(module, [str(a) for a in argv])
        fake(module, argv)
    monkeypatch.setattr(campaign, "_run_verb", spy)
    campaign.run(CampaignConfig(pack=tmp_path / "p.npz", out=tmp_path / "r", models=_models(tmp_path),
                                device="cuda", until="train", workers=14, val_samples=48))
    argv = seen["Training.training.train_synth"]
    assert {f: argv[argv.index(f) + 1] for f in ("--source", "--workers", "--val-samples")} == {
        "--source": "gpu", "--workers": "14", "--val-samples": "48"}
    assert "--patch" not in argv and "Training.training.export" not in seen


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="--until must be one of train, export, decide, not 'search'"):
        campaign.run(CampaignConfig(out=tmp_path / "r", until="search"))
    with pytest.raises(cfg.ConfigError, match="--val"):
        campaign.run(CampaignConfig(out=tmp_path / "r"))
    with pytest.raises(cfg.ConfigError, match="is not a folder"):
        campaign.run(CampaignConfig(val=(tmp_path / "missing",), out=tmp_path / "r"))
    (tmp_path / "val").mkdir()
    with pytest.raises(cfg.ConfigError, match="holds no bundle"):
        campaign.run(CampaignConfig(val=(tmp_path / "val",), out=tmp_path / "r", models=tmp_path))


def test_the_guard_goes_to_both_searches_and_is_checked_before_training(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    models = _models(tmp_path)
    (tmp_path / "val_mimics").mkdir()
    seen: list = []
    _fake_verbs(monkeypatch, {"candidate": 0.6, "shipped": 0.5}, [])
    fake = campaign._run_verb

    def spy(module: str, argv: list) -> None:
        seen.append((module, [str(a) for a in argv]))
        fake(module, argv)

    monkeypatch.setattr(campaign, "_run_verb", spy)
    campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val_mimics",), out=tmp_path / "run",
                                models=models, guard=GUARD, guard_sets="val_mimics"))
    searches = [argv for module, argv in seen if module == "Training.evaluation.postprocess"]
    assert len(searches) == 2
    for argv in searches:
        assert argv[argv.index("--guard") + 1] == str(GUARD) and argv[argv.index("--guard-sets") + 1] == "val_mimics"
    seen.clear()
    for guard, sets, match in ((GUARD, "", "go together"), (None, "val_mimics", "go together"),
                               (tmp_path / "none.json", "val_mimics", "not a file"),
                               (GUARD, "val_other", "not among the --val sets")):
        with pytest.raises(cfg.ConfigError, match=match):
            campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val_mimics",), out=tmp_path / "r2",
                                        models=models, guard=guard, guard_sets=sets))
    assert seen == []  # refused before any training


def test_a_matching_earlier_search_of_the_shipped_bundle_is_reused(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    models = _models(tmp_path)
    (tmp_path / "val").mkdir()
    earlier = tmp_path / "pp"
    earlier.mkdir()
    (earlier / "postprocess.json").write_text(json.dumps(_result(0.5, 0.5, 0.3)))
    grid = {key: list(getattr(PostprocessConfig(), key)) for key in SEARCH_GRID_FIELDS}
    (earlier / "postprocess_config.json").write_text(json.dumps(
        {"data": [str(tmp_path / "val")], "max_cases": 12, "mc_samples": 20, "flip_tta": [True], **grid}))
    calls: list = []
    _fake_verbs(monkeypatch, {"candidate": 0.6, "shipped": 0.0}, calls)
    config = CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "run3", models=models,
                            max_cases=12, flip_tta="true", shipped_search=earlier / "postprocess.json")
    result = campaign.run(config)
    assert calls.count("Training.evaluation.postprocess") == 1  # only the candidate was searched
    assert not (tmp_path / "run3" / "shipped").exists()  # so the shipped bundle was not copied either
    assert result["decision"]["shipped"]["score"] == 0.5 and result["outcome"] == "would ship (run without --ship)"

    other = CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "run4", models=models,
                           max_cases=16, flip_tta="true", shipped_search=earlier / "postprocess.json")
    with pytest.raises(cfg.ConfigError, match="other max_cases"):
        campaign.run(other)
    guarded = CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "run6", models=models,
                             max_cases=12, flip_tta="true", shipped_search=earlier / "postprocess.json",
                             guard=GUARD, guard_sets="val")
    with pytest.raises(cfg.ConfigError, match="other guard"):  # searched without the guard
        campaign.run(guarded)
    (earlier / "postprocess_config.json").write_text(json.dumps(
        {"data": [str(tmp_path / "val")], "max_cases": 12, "mc_samples": 20, "flip_tta": [True],
         **{**grid, "thresholds": [0.3, 0.4, 0.5, 0.6, 0.7]}}))
    with pytest.raises(cfg.ConfigError, match="other thresholds"):  # searched on an older grid
        campaign.run(config)
    (earlier / "postprocess_config.json").write_text(json.dumps(
        {"data": [str(tmp_path / "val")], "max_cases": 12, "mc_samples": 20, "flip_tta": [True], **grid}))
    stale = _result(0.5, 0.5, 0.3)
    del stale["keeps_small"]
    (earlier / "postprocess.json").write_text(json.dumps(stale))
    with pytest.raises(cfg.ConfigError, match="predates the small-lesion reference"):
        campaign.run(CampaignConfig(pack=tmp_path / "p.npz", val=(tmp_path / "val",), out=tmp_path / "run5",
                                    models=models, max_cases=12, flip_tta="true",
                                    shipped_search=earlier / "postprocess.json"))
