"""visualize: which existing figures block a run, and a training-curves figure whose labels do not overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from StrokePredictorLib.errors import OutputExistsError
from Training.evaluation import visualize


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch,step,lr,train_loss,val_loss,val_dice,best_val_dice\n"
                                 "1,10,0.001,0.9,0.8,0.1,0.1\n2,20,0.0009,0.7,0.6,0.3,0.3\n")
    return run


def test_a_folder_with_other_pictures_is_no_obstacle_but_our_figures_are(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "figures"
    out.mkdir()
    (out / "montage.png").write_bytes(b"not ours")
    written = visualize.run(visualize.VisualizeConfig(run=run, out=out))
    assert [p.name for p in written] == ["training_curves.png"]
    assert (out / "montage.png").read_bytes() == b"not ours"
    with pytest.raises(OutputExistsError, match="training_curves.png"):
        visualize.run(visualize.VisualizeConfig(run=run, out=out))
    assert visualize.run(visualize.VisualizeConfig(run=run, out=out, overwrite=True))


def test_training_curves_labels_stay_in_their_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(visualize, "_save", lambda figure, path, dpi, overwrite: figures.append(figure) or path)
    visualize.training_curves(_run_folder(tmp_path), tmp_path)
    figure = figures[0]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [axis.get_tightbbox(renderer) for axis in figure.axes]
    for left, right in zip(boxes, boxes[1:], strict=False):
        assert left.x1 <= right.x0 + 1  # the lr panel's y-label does not run into the Dice panel
