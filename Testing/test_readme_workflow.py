"""The README's research workflows run end to end, exactly as written, on a tiny generated dataset.

The commands are read from README.md (the bash blocks of "Research workflow on the real ISLES
2022 download" and "Training on generated data"), so an edit that breaks the chain (a step
writing one folder and the next reading another, a config file whose ``cache`` or ``out`` differs
from the README's paths, a removed step) fails here. The verbs run in this process (their imports
are paid once) with the test's folder as the working directory. Only the scale changes: the data
are 4 tiny generated cases (``generate --tiny``; for ISLES 2022 without the clinical CSV and the
outcome masks, as in the Zenodo download), and flags appended to each verb shrink the model grid,
the steps, the search grid and the Monte-Carlo samples. Appended flags never name a path: the
paths are the README's. Measured: about 90 s of CPU time for both workflows together.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ISLES_SECTION = "## Research workflow on the real ISLES 2022 download"
GENERATED_SECTION = "### Training on generated data"

# Flags appended to each verb: the scale of the run only, never a path.
SCALE = {
    "preprocess": ["--grid-size", "16,16,32", "--grid-spacing", "10,10,6", "--workers", "1", "--no-progress"],
    "train": ["--max-steps", "2", "--workers", "0", "--no-progress", "--no-tensorboard", "--device", "cpu"],
    "postprocess": ["--mc-samples", "2", "--device", "cpu", "--thresholds", "0.3,0.5", "--min-components-ml", "0,0.1",
                    "--max-component-adcs", "0", "--min-component-probabilities", "0", "--small-components-ml", "0",
                    "--force"],
    "evaluate": ["--mc-samples", "2", "--device", "cpu", "--no-progress"],
    "ablate": ["--max-steps", "1", "--mc-samples", "2", "--bootstrap", "50", "--device", "cpu"],
    "visualize": ["--dpi", "40"],
}


def readme_commands(section: str, readme: Path = REPO / "README.md") -> list[list[str]]:
    """The ``python -m Training`` commands of the first bash block under ``section``, as argv lists
    (continuation lines joined, comments dropped)."""
    lines = readme.read_text().splitlines(keepends=True)
    level = len(section.split(" ")[0])
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == section)
    body, fenced = [], False
    for line in lines[start + 1:]:
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) ", line)
        if not fenced and heading and len(heading.group(1)) <= level and not line.startswith("```"):
            break
        body.append(line)
    body = "".join(body)
    block = re.search(r"```bash\n(.*?)```", body, re.DOTALL)
    assert block, f"no bash block under '{section}'"
    joined = re.sub(r"\\\n\s*", " ", block.group(1))
    commands = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("python -m Training "):
            commands.append(shlex.split(line)[3:])
    return commands


def _run(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``python -m Training ARGV`` in ``cwd``, in this process (the verbs' imports are paid once);
    returns (exit code, what it wrote to stderr)."""
    import contextlib
    import io

    from Training.__main__ import main

    err = io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        os.chdir(previous)
    return code, err.getvalue()


def _generate_tiny(argv: list[str], cwd: Path) -> None:
    """The README's ``generate`` at test scale: same --out, --seed and --ood; 4 tiny cases (2 for an
    out-of-distribution set, which is evaluated whole)."""
    out = argv[argv.index("--out") + 1]
    seed = argv[argv.index("--seed") + 1] if "--seed" in argv else "0"
    extra = ["--ood"] if "--ood" in argv else []
    cases = "2" if extra else "4"
    code, err = _run(["generate", "--out", out, "--cases", cases, "--seed", seed, "--tiny", *extra], cwd)
    assert code == 0, err[-3000:]


def _config_path(argv: list[str]) -> list[str]:
    """``--config Training/configs/X.yaml`` and ``--train-config ...`` read from this checkout."""
    return [str(REPO / value) if value.startswith("Training/configs/") else value for value in argv]


def run_workflow(commands: list[list[str]], cwd: Path) -> dict[str, list[str]]:
    """Run the commands in order (generate at test scale); returns {verb: argv} of what ran."""
    ran: dict[str, list[str]] = {}
    for argv in commands:
        verb = argv[0]
        if verb == "generate":
            _generate_tiny(argv, cwd)
            continue
        full = _config_path(argv) + SCALE.get(verb, [])
        code, err = _run(full, cwd)
        assert code == 0, f"`python -m Training {shlex.join(argv)}` failed ({code}):\n{err[-4000:]}"
        ran[verb] = argv
    return ran


def test_readme_commands_are_extracted() -> None:
    isles = [argv[0] for argv in readme_commands(ISLES_SECTION)]
    assert isles == ["clinical", "preprocess", "train", "export", "postprocess", "evaluate", "ablate", "visualize"]
    generated = [argv[0] for argv in readme_commands(GENERATED_SECTION)]
    assert generated[:2] == ["generate", "generate"] and "train" in generated and "evaluate" in generated


@pytest.mark.slow
def test_isles_workflow_chains_end_to_end(tmp_path: Path) -> None:
    commands = readme_commands(ISLES_SECTION)
    clinical = commands[0]
    data = Path(clinical[clinical.index("--input") + 1])
    # the Zenodo download at test scale: ISLES layout, acute masks only, no clinical CSV
    _generate_tiny(["generate", "--out", str(data), "--seed", "7"], tmp_path)
    (tmp_path / data / "clinical.csv").unlink()
    for outcome in (tmp_path / data / "derivatives").rglob("*_outcome.nii.gz"):
        outcome.unlink()
    ran = run_workflow(commands, tmp_path)
    assert list(ran) == ["clinical", "preprocess", "train", "export", "postprocess", "evaluate", "ablate",
                         "visualize"]
    evaluate = ran["evaluate"]
    assert (tmp_path / evaluate[evaluate.index("--out") + 1] / "results.md").is_file()
    ablate = ran["ablate"]
    report = (tmp_path / ablate[ablate.index("--out") + 1] / "ablation.md").read_text()
    # one step per arm, one test case: beside every figure, and flagged
    assert report.count("| acute | ") == 3 and all(
        line.split(" | ")[2:4] == ["1", "1"] for line in report.splitlines() if line.startswith("| acute | "))
    assert "only 1 training steps per arm" in report and "only 1 evaluated case(s)" in report
    visualize = ran["visualize"]
    assert list((tmp_path / visualize[visualize.index("--out") + 1]).glob("*.png"))


@pytest.mark.slow
def test_generated_data_workflow_chains_end_to_end(tmp_path: Path) -> None:
    ran = run_workflow(readme_commands(GENERATED_SECTION), tmp_path)
    assert {"preprocess", "train", "export", "evaluate"} <= set(ran)
    evaluate = ran["evaluate"]
    assert (tmp_path / evaluate[evaluate.index("--out") + 1] / "results.md").is_file()


@pytest.mark.parametrize("data_set", ["isles", "generated"])
def test_cpu_and_gpu_configs_of_a_data_set_chain_alike(data_set: str) -> None:
    """The README runs the CPU config; the GPU config it names must read and write the same folders."""
    from Training import config as config_mod

    cpu = config_mod.load_file(REPO / "Training" / "configs" / f"train_cpu_{data_set}.yaml")
    gpu = config_mod.load_file(REPO / "Training" / "configs" / f"train_gpu_{data_set}.yaml")
    assert (gpu["cache"], gpu["out"], gpu["preset"]) == (cpu["cache"], cpu["out"], cpu["preset"])
    section = ISLES_SECTION if data_set == "isles" else GENERATED_SECTION
    commands = readme_commands(section)
    preprocess = next(argv for argv in commands if argv[0] == "preprocess")
    export = next(argv for argv in commands if argv[0] == "export")
    assert preprocess[preprocess.index("--out") + 1] == cpu["cache"]
    assert preprocess[preprocess.index("--preset") + 1] == cpu["preset"]
    assert export[export.index("--run") + 1] == cpu["out"]
