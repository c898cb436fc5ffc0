"""``python -m Training <verb> [options]``: the research command line.

Each verb lives in its own module exposing ``main(argv: list[str]) -> int`` and is imported
only when used, so that a verb's heavy dependencies do not slow the others down. The modules lie
in the pipeline's stages (synthesis, clinical, data, training, evaluation; the map is in
:mod:`Training`), and :data:`VERBS` names each verb's module.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

from StrokePredictorLib.errors import StrokePredictorError

VERBS: dict[str, tuple[str, str]] = {
    "demo": ("Training.demo", "the main job on the bundled defaults: sample case -> prediction -> files and PNG"),
    "generate": ("Training.synthesis.generate", "generate a semi-synthetic dataset in the ISLES 2022 layout"),
    "clinical": ("Training.clinical.clinical_data",
                 "write a clinical CSV for an ISLES 2022 folder (observed + simulated)"),
    "synthpack": ("Training.synthesis.synthpack",
                  "build the GPU synthesis pack (MNI anatomy + SOOP lesions) for training"),
    "preprocess": ("Training.data.cache", "preprocess an ISLES-layout folder once into a training cache and split"),
    "train": ("Training.training.train", "train the multimodal network (CPU, CUDA, torchrun)"),
    "train-synth": ("Training.training.train_synth",
                    "train on synthesised data (per step or a CPU pool), variants in lockstep"),
    "evaluate": ("Training.evaluation.evaluate", "evaluate a checkpoint or bundle with the ISLES 2022 metrics"),
    "postprocess": ("Training.evaluation.postprocess",
                    "choose threshold, flip averaging, smallest lesion on validation data"),
    "fit-growth": ("Training.training.fit_growth",
                   "fit the clinical growth head of an outcome bundle on frozen imaging features"),
    "interpolate": ("Training.training.interpolate", "weights between a model and its fine-tuned version (WiSE-FT)"),
    "campaign": ("Training.campaign", "improve the shipped bundle: train, search, decide by a fixed rule, record"),
    "noise": ("Training.evaluation.input_noise",
              "is the training synthesis as noisy as the fixed sets? (fine-scale input fluctuation)"),
    "select": ("Training.evaluation.select",
               "choose an outcome run's checkpoint on validation growth, effects and Dice"),
    "ablate": ("Training.evaluation.ablate", "imaging-only against fusion on the same split"),
    "behaviour": ("Training.evaluation.clinical_behaviour", "do predictions follow onset, treatment, NIHSS?"),
    "visualize": ("Training.evaluation.visualize",
                  "figures: training curves, overlays, reliability diagram, attention"),
    "card": ("Training.evaluation.model_card", "write a bundle's model card from measured evaluation results"),
    "export": ("Training.training.export", "export a checkpoint as a model bundle for the Slicer module"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: python -m Training <verb> [options]   (python -m Training <verb> --help)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb '{verb}'.\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        module = importlib.import_module(VERBS[verb][0])
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("Training."):
            print(f"error: the '{verb}' verb is not available in this version.", file=sys.stderr)
            return 2
        raise
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(module.main(rest) or 0)
    except StrokePredictorError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM as an exception, so that every verb's ``finally`` and ``except BaseException``
    clean-up runs as it does for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:  # noqa: ARG001
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
