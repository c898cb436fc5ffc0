"""Training/training/loop.py: the engine that ``train`` and ``train-synth`` share (schedule,
precision, optimiser state, log format, and members of different tasks trained in lockstep)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from Training import config as configlib
from Training.training import loop


# ---- schedule ---------------------------------------------------------------------------------
def test_step_clock_warms_up_then_follows_the_cosine() -> None:
    schedule = loop.Schedule(lr=1.0, min_ratio=0.0, warmup=0.1, steps=100)
    assert not schedule.by_time(50, 1e9)  # no time budget: elapsed time plays no part
    assert schedule.factor(0, 0.0) == pytest.approx(0.1)
    assert schedule.factor(9, 0.0) == pytest.approx(1.0)
    assert schedule.factor(55, 123.0) == pytest.approx(0.5)  # half-way through the cosine
    assert schedule.factor(100, 0.0) == pytest.approx(0.0)


def test_time_clock_follows_the_elapsed_fraction_of_the_budget() -> None:
    schedule = loop.Schedule(lr=1.0, min_ratio=0.1, warmup=0.1, seconds=100.0)
    assert schedule.by_time(0, 0.0)
    assert schedule.factor(3, 5.0) == pytest.approx(501 / 1000)  # tick 500 of a 1000-tick warm-up
    assert schedule.factor(7, 55.0) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert schedule.factor(9, 500.0) == pytest.approx(0.1)  # past the budget: the floor


def test_the_budget_that_ends_first_sets_the_clock() -> None:
    schedule = loop.Schedule(lr=1.0, min_ratio=0.0, warmup=0.1, steps=1000, seconds=100.0)
    assert schedule.by_time(10, 50.0)  # half the time, 1% of the steps: time ends the run
    assert schedule.factor(10, 55.0) == pytest.approx(0.5)
    assert not schedule.by_time(900, 10.0)
    assert schedule.factor(900, 10.0) == pytest.approx(loop.lr_factor(900, 100, 1000, 0.0))


def test_fixed_warmup_steps_under_a_time_budget() -> None:
    schedule = loop.Schedule(lr=1.0, min_ratio=0.0, warmup_steps=4, seconds=100.0)
    assert schedule.factor(0, 0.0) == pytest.approx(0.25)
    assert schedule.factor(1, 0.0) == pytest.approx(0.5)
    assert schedule.factor(9, 50.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_length_is_a_fraction_or_capped_fixed_steps() -> None:
    assert loop.warmup_length(2000, 0.05) == 100
    assert loop.warmup_length(20, 0.05) == 1
    assert loop.warmup_length(20, 0.05, fixed=50) == 4
    assert loop.warmup_length(2000, 0.05, fixed=50) == 50


# ---- precision and optimiser state -----------------------------------------------------------
def test_precision_resolution(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)  # AVX2 only: bf16 would be emulated
    auto = loop.Precision.resolve("auto", cpu)
    assert (auto.name, auto.channels_last, auto.autocast_args["enabled"]) == ("fp32", True, False)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        bf16 = loop.Precision.resolve("bf16", cpu)  # asked for explicitly: honoured, with a warning
    assert "no native bfloat16" in caplog.text
    assert bf16.channels_last and bf16.autocast_args == {"device_type": "cpu", "dtype": torch.bfloat16,
                                                         "enabled": True}
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)  # AVX-512 or AMX
    assert loop.Precision.resolve("auto", cpu).name == "fp32"  # train keeps fp32 on the CPU
    from Training.training.train_synth import resolve_precision
    assert resolve_precision("auto", cpu).name == "bf16"  # the train-synth CPU recipe takes native bf16
    assert resolve_precision("fp32", cpu).name == "fp32"
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu).name == "fp32"
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    assert not loop.Precision.resolve("bf16", cpu, channels_last=False).channels_last
    assert not bf16.scaler().is_enabled()
    image = torch.zeros(1, 3, 4, 4, 4)
    assert bf16.layout(image).is_contiguous(memory_format=torch.channels_last_3d)
    plain = loop.Precision.resolve("fp32", cpu, channels_last=False)
    assert plain.layout(image) is image
    with pytest.raises(configlib.ConfigError, match="precision"):
        loop.Precision.resolve("fp8", cpu)


def test_native_bf16_follows_the_cpu_query(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for answer in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda answer=answer: answer)
        assert loop.native_bf16(cpu) is answer

    def missing() -> bool:
        raise RuntimeError("no oneDNN")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert loop.native_bf16(cpu) is False


def _toy_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))


def test_a_one_group_optimiser_state_is_mapped_onto_the_decay_groups() -> None:
    model = _toy_net()
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # as train-synth ran before
    for value in (1.0, -2.0):
        model(torch.full((2, 4), value)).sum().backward()
        old.step()
        old.zero_grad()
    expected = {id(p): old.state[p]["exp_avg"].clone() for p in model.parameters()}
    new = loop.make_optimizer(model, 1e-3, 0.01)
    assert len(new.param_groups) == 2
    loop.load_optimizer_state(new, old.state_dict(), model)
    for group, decay in zip(new.param_groups, (0.01, 0.0), strict=True):
        assert group["weight_decay"] == decay
        for parameter in group["params"]:
            assert torch.equal(new.state[parameter]["exp_avg"], expected[id(parameter)])
            assert int(new.state[parameter]["step"]) == 2


def test_the_growth_head_gets_its_own_rate_and_no_weight_decay() -> None:
    from StrokePredictorLib.network import NetworkConfig, StrokeNet

    model = StrokeNet(NetworkConfig(fusion_dim=16, heads=2, growth=True))
    growth = {id(p) for name, p in model.named_parameters() if name.startswith("growth.")}
    assert growth
    plain = loop.make_optimizer(model, 1e-4, 0.01)
    assert len(plain.param_groups) == 2
    scaled = loop.make_optimizer(model, 1e-4, 0.01, growth_lr_scale=20.0)
    assert len(scaled.param_groups) == 3
    third = scaled.param_groups[2]
    assert {id(p) for p in third["params"]} == growth
    assert third["weight_decay"] == 0.0 and third["lr"] == pytest.approx(2e-3)
    assert all(group["lr"] == pytest.approx(1e-4) for group in scaled.param_groups[:2])
    assert sum(len(g["params"]) for g in scaled.param_groups) == sum(1 for _ in model.parameters())
    loop.set_lr(scaled.param_groups, 5e-5)  # what every training step does with the schedule's rate
    assert [group["lr"] for group in scaled.param_groups] == pytest.approx([5e-5, 5e-5, 1e-3])


def test_an_older_train_synth_log_is_rewritten_in_the_shared_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("step,seconds,lr,train_loss,val_dice\n150,61.5,0.002,0.71,0.42\n")
    with loop._open_log(path, append=True) as handle:
        csv.writer(handle).writerow([2, 300, 0.001, 0.6, 0.5, 0.45, 0.45, 122.0, 3.5])
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == loop.LOG_COLUMNS
    assert [(r["step"], r["elapsed_s"], r["val_dice"]) for r in rows] == [("150", "61.5", "0.42"),
                                                                         ("300", "122.0", "0.45")]
    with loop._open_log(tmp_path / "new.csv", append=True) as handle:  # nothing to continue: a new log
        pass
    assert (tmp_path / "new.csv").read_text().strip() == ",".join(loop.LOG_COLUMNS)


# ---- the loop on a toy source ------------------------------------------------------------------
class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)

    def forward(self, image, values, missing, flair):  # noqa: ANN001, ANN201, ARG002
        return {"logits": self.conv(image)}


class _ToySource:
    """Batch of step ``s``: a function of ``s`` alone; targets of two tasks differ."""

    val_cases = 1

    def __init__(self, stop_at: int = 0) -> None:
        self.step, self.stop_at = 0, stop_at  # stop_at: Ctrl-C before that step's batch
        self.targets: list[tuple[int, str]] = []

    def start(self, step: int) -> None:
        self.step = step

    def begin_epoch(self, step: int, stop: int) -> None:
        assert step == self.step

    def next_batch(self) -> dict:
        if self.stop_at and self.step == self.stop_at:
            raise KeyboardInterrupt
        generator = torch.Generator().manual_seed(self.step)
        image = torch.rand(2, 1, 4, 4, 4, generator=generator)
        self.step += 1
        return {"image": image, "acute": (image > 0.5).float(), "outcome": (image > 0.8).float(),
                "clinical_values": torch.zeros(2, 10), "clinical_missing": torch.ones(2, 10, dtype=torch.bool),
                "flair_present": torch.ones(2, dtype=torch.bool), "step": self.step}

    def target(self, batch: dict, task: str) -> torch.Tensor:
        self.targets.append((batch["step"], task))
        return batch[task]

    def validate(self, members, loss_fn, precision):  # noqa: ANN001, ANN201, ARG002
        return {m.name: (0.5, float(m.model.conv.bias.detach()) % 1.0) for m in members}

    def status(self) -> str:
        return ""

    def close(self) -> None:
        pass


def _members(tmp_path: Path, checkpoints: dict | None = None) -> list[loop.Member]:
    members = []
    for task in ("acute", "outcome"):
        torch.manual_seed(1)
        members.append(loop.Member(task, task, _Toy(), tmp_path / task, {"task": task},
                                   checkpoint=(checkpoints or {}).get(task)))
    return members


def _options(steps: int) -> loop.LoopOptions:
    return loop.LoopOptions(schedule=loop.Schedule(lr=0.05, min_ratio=0.1, steps=steps), epoch_steps=3,
                            batch_size=2, checkpoint_minutes=0.0)


def test_members_of_two_tasks_train_in_lockstep_and_resume_exactly(tmp_path: Path) -> None:
    source = _ToySource()
    loss = torch.nn.BCEWithLogitsLoss()
    fp32 = loop.Precision.resolve("fp32", torch.device("cpu"))
    full = loop.run_loop(_members(tmp_path / "full"), source, loss, fp32, _options(6))
    # each step's batch went to both members, each with its own task's target
    assert source.targets == [(s, t) for s in range(1, 7) for t in ("acute", "outcome")]
    assert full["acute"]["steps"] == full["outcome"]["steps"] == 6 and full["acute"]["epochs"] == 2
    assert full["acute"]["stopped"] == "max_steps"
    a = torch.load(tmp_path / "full" / "acute" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "full" / "outcome" / "checkpoints" / "last.pt", weights_only=False)
    assert not torch.equal(a["model"]["conv.weight"], b["model"]["conv.weight"])  # different targets learnt
    assert {"model", "optimizer", "scaler", "rng", "epoch", "step", "best_val_dice", "elapsed_s",
            "epoch_loss_sum", "val_dice", "task"} <= set(a)
    assert (a["epoch"], a["step"], a["task"]) == (2, 6, "acute")

    # interrupted after three steps (the end of epoch 1), then resumed: the same weights, and
    # the steps and the time add up
    with pytest.raises(KeyboardInterrupt):
        loop.run_loop(_members(tmp_path / "split"), _ToySource(stop_at=3), loss, fp32, _options(6))
    saved = {task: torch.load(tmp_path / "split" / task / "checkpoints" / "last.pt", weights_only=False)
             for task in ("acute", "outcome")}
    saved["acute"]["elapsed_s"] = saved["outcome"]["elapsed_s"] = 1000.0
    assert saved["acute"]["step"] == 3
    resumed = loop.run_loop(_members(tmp_path / "split", saved), _ToySource(), loss, fp32, _options(6))
    assert resumed["acute"]["steps"] == 6 and resumed["acute"]["seconds"] > 1000.0
    c = torch.load(tmp_path / "split" / "acute" / "checkpoints" / "last.pt", weights_only=False)
    for key in a["model"]:
        assert torch.allclose(a["model"][key], c["model"][key], atol=1e-7, rtol=0), key
    with (tmp_path / "split" / "acute" / "log.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "3"), ("2", "6")]
    # the log keeps two decimals and the toy steps take milliseconds: the resumed row counts the
    # earlier 1000 s (a restarted clock would log about 0)
    assert float(rows[1]["elapsed_s"]) >= 1000.0


# ---- growth heads: the core learns the acute lesion too ------------------------------------------
def test_core_weight_adds_the_core_heads_loss_against_the_acute_lesion() -> None:
    from inference_phantom import tiny_config

    from StrokePredictorLib.network import StrokeNet

    def step(core_weight: float, model_config: dict) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        model = StrokeNet(tiny_config(mc_dropout=0.0, feature_dropout=0.0, **model_config))
        image = torch.rand(2, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
        acute = torch.zeros(2, 1, 16, 16, 16)
        acute[:, :, 4:8, 4:8, 4:8] = 1.0
        target = torch.zeros_like(acute)
        target[:, :, 2:10, 2:10, 2:10] = 1.0
        batch = {"clinical_values": torch.zeros(2, 10), "clinical_missing": torch.ones(2, 10, dtype=torch.bool),
                 "flair_present": torch.ones(2, dtype=torch.bool), "acute": acute}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, applied = loop.optimise(model, image, batch, target, optimizer, scaler,
                                      lambda logits, t: torch.nn.functional.binary_cross_entropy_with_logits(logits, t),
                                      autocast={"device_type": "cpu", "enabled": False}, core_weight=core_weight)
        assert applied
        return float(loss), model.head.weight.grad.clone()

    plain, plain_grad = step(0.0, {"growth": True})
    both, both_grad = step(1.0, {"growth": True})
    assert both > plain + 0.1 and not torch.allclose(plain_grad, both_grad)
    # without a growth head there is no core output: the weight changes nothing
    assert step(1.0, {})[0] == pytest.approx(step(0.0, {})[0])


def test_the_growth_penalty_adds_the_mean_square_of_the_features_shares() -> None:
    """``growth_l2`` adds that weight times the mean square of ``growth_terms`` (each clinical
    feature's additive share of the growth offset) to the step's loss, and its gradient reaches
    the additive model; at 0 the loss is the plain one."""
    from StrokePredictorLib.clinical import encode, validate
    from StrokePredictorLib.network import NetworkConfig, StrokeNet

    torch.manual_seed(3)
    config = NetworkConfig(stem_channels=8, full_res_channels=4, widths=(8, 16), blocks=(1, 1),
                           decoder_widths=(8, 4), head_channels=4, fusion_dim=16, heads=2, growth=True,
                           mc_dropout=0.0, feature_dropout=0.0)
    model = StrokeNet(config)
    with torch.no_grad():  # the additive model starts at 0; give it shares to penalise
        model.growth.additive[2].weight.normal_(0, 1.0)
    values, missing = encode(validate({"age": 70, "sex": "F", "nihss": 12, "onset_to_imaging_h": 3}))
    batch = {"clinical_values": torch.from_numpy(values)[None], "clinical_missing": torch.from_numpy(missing)[None],
             "flair_present": torch.tensor([True])}
    image = torch.randn(1, 3, 16, 16, 16)
    target = (torch.rand(1, 1, 16, 16, 16) > 0.8).float()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)

    def step(weight: float) -> tuple[float, torch.Tensor]:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler(enabled=False)
        loss, applied = loop.optimise(model, image, batch, target, optimizer, scaler, loss_fn,
                                      autocast={"device_type": "cpu", "enabled": False}, growth_l2=weight)
        assert applied
        grad = model.growth.additive[2].weight.grad.clone()
        model.load_state_dict(state)
        return float(loss), grad

    model.train()
    with torch.no_grad():
        out = model(image, batch["clinical_values"], batch["clinical_missing"], batch["flair_present"])
    terms = out["growth_terms"]
    assert terms.shape == (1, 8) and float(terms.abs().min()) > 0
    plain, plain_grad = step(0.0)
    penalised, penalised_grad = step(0.5)
    assert penalised - plain == pytest.approx(0.5 * float(terms.square().mean()), rel=1e-4)
    assert not torch.allclose(plain_grad, penalised_grad)
