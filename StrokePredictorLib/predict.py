"""Command line: predict the stroke lesion of one case, or of every case of an ISLES 2022 folder.

Single case::

    python -m StrokePredictorLib.predict --dwi DWI --adc ADC [--flair FLAIR]
        [--clinical clinical.json | --clinical nihss=12 age=71 ...] [--bundle DIR] --out DIR
        [--mc-samples 20] [--seed 0] [--device auto|cpu|cuda] [--threshold T] [--min-component-ml V]
        [--tta | --no-tta] [--max-component-adc A] [--effects] [--overwrite]
        [--what-if FIELD=V1,V2,... ...]

``--what-if onset_to_imaging_h=2,6,12 treatment=none,thrombectomy`` also predicts every
combination of those values (the other clinical values as given), re-running only the
clinical-dependent part of the network, and writes ``what_if.tsv``/``.json`` (volumes with
intervals per scenario) and ``what_if.png`` (volume against onset time, one line per treatment).
With ``--effects``, each given feature's measured effect on the volume (the change when it alone is
set to missing) is written beside its attention weight. It costs one extra decoder pass per given
feature (about 0.7 s each on 2 CPU cores), so it is off by default to keep a prediction within 10 s;
the Slicer panel asks for it.

``--threshold``, ``--min-component-ml``, ``--tta`` and ``--max-component-adc`` override the post-processing that the
bundle carries (chosen on validation data; see :mod:`StrokePredictorLib.postprocess`).

Batch (one sub-folder per case id, plus ``batch_summary.json``)::

    python -m StrokePredictorLib.predict --isles DIR [--clinical-csv clinical.csv [--allow-unmatched]] --out DIR

Standard output carries ``PROGRESS <fraction> <message>`` lines while working and, last,
``RESULT <path of summary.json>`` (``batch_summary.json`` in batch mode). An error prints one line
``error: <message>`` on standard error and exits with status 2; nothing is written. The output
folder is checked (writable, not an input's folder when overwriting, outputs replaced only in a
folder StrokePredictor wrote) before anything is computed. SIGTERM is handled like Ctrl-C: the
temporary files are removed and the exit status is 143 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from StrokePredictorLib.errors import ClinicalValueError, OutputExistsError, StrokePredictorError

MAX_MC_SAMPLES = 200  # StrokePredictorLib.inference.MAX_MC_SAMPLES, without importing torch for --help

logger = logging.getLogger(__name__)


class _ArgumentError(StrokePredictorError):
    """A command-line usage error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgumentError(f"{message} (see --help)")


def _describe(summary_path: Path) -> str:
    """One line for a person: the lesion volume with its interval, the warnings, where the outputs are."""
    import json

    summary = json.loads(summary_path.read_text())
    volume = summary.get("lesion_volume_ml", {})
    low, high = volume.get("ci95", (float("nan"), float("nan")))
    warnings = summary.get("warnings") or []
    text = (f"Lesion volume {volume.get('mask', float('nan')):.1f} mL (95% interval {low:.1f}-{high:.1f} mL); "
            f"outputs in {summary_path.parent}")
    return text + (f"; {len(warnings)} warning(s): " + " | ".join(map(str, warnings)) if warnings else "")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m StrokePredictorLib.predict",
        allow_abbrev=False,
        description="Predict the acute stroke lesion (probability, Monte-Carlo uncertainty, lesion volume with "
                    "interval, clinical attention) from DWI, ADC, optional FLAIR and clinical values.",
    )
    inputs = parser.add_argument_group("single case")
    inputs.add_argument("--dwi", help="DWI volume (b=1000 or b=800 trace); all outputs lie on its grid")
    inputs.add_argument("--adc", help="ADC map (mm^2/s, 10^-3 or 10^-6 mm^2/s: detected)")
    inputs.add_argument("--flair", help="optional FLAIR volume, on any grid (registered rigidly to the DWI)")
    inputs.add_argument(
        "--clinical", nargs="+", metavar="JSON_OR_KEY=VALUE",
        help="clinical values: a JSON file, or name=value pairs (e.g. nihss=12 age=71 onset_to_imaging_h=unknown)",
    )
    batch = parser.add_argument_group("batch")
    batch.add_argument("--isles", help="ISLES 2022 folder (Zenodo or challenge layout): predict every case")
    batch.add_argument("--clinical-csv", help="clinical CSV with a case_id column and the schema's fields")
    batch.add_argument("--allow-unmatched", action="store_true",
                       help="run even when clinical CSV rows match no case (they are listed; otherwise an error)")
    parser.add_argument("--bundle", help="model bundle folder (default: $STROKEPREDICTOR_BUNDLE or the bundled model)")
    parser.add_argument("--out", required=True, help="output folder (batch: one sub-folder per case)")
    parser.add_argument("--mc-samples", type=int, default=20,
                        help=f"Monte-Carlo dropout samples, 1 to {MAX_MC_SAMPLES} (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dropout masks, 0 to 2**63 - 1 (default 0)")
    parser.add_argument("--deterministic", action="store_true", help="dropout off (zero Monte-Carlo spread)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda (default auto)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="lesion probability threshold (default: the bundle's, else 0.5)")
    parser.add_argument("--min-component-ml", type=float, default=None,
                        help="remove lesion components smaller than this, in mL (default: the bundle's, else 0)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the left-right mirrored input (default: the bundle's, else off)")
    parser.add_argument("--max-component-adc", type=float, default=None,
                        help="remove lesion components whose median ADC is at least this, in 10^-3 mm^2/s; "
                             "0 keeps all (default: the bundle's, else 0)")
    parser.add_argument("--what-if", nargs="+", metavar="FIELD=V1,V2",
                        help="single case: also predict every combination of these clinical values, e.g. "
                             "onset_to_imaging_h=2,6,12 treatment=none,thrombectomy (what_if.tsv/.json/.png)")
    parser.add_argument("--effects", action=argparse.BooleanOptionalAction, default=False,
                        help="measure each given clinical feature's effect on the volume (one extra decoder pass "
                             "per given feature, about 0.7 s each on 2 CPU cores; default off)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output files of an earlier prediction in --out (never other files, and "
                             "never when an input lies inside --out)")
    parser.add_argument("--verbose", action="store_true", help="log details on standard error")
    return parser


def _progress(fraction: float, message: str) -> None:
    print(f"PROGRESS {min(max(fraction, 0.0), 1.0):.3f} {message}", flush=True)


def _clinical_from_args(items: Sequence[str] | None):  # -> ClinicalRecord | None
    from StrokePredictorLib import clinical

    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return clinical.read_json(items[0])
    if any("=" not in item for item in items):
        raise ClinicalValueError(
            "--clinical takes either one JSON file or name=value pairs (e.g. nihss=12), not a mixture."
        )
    return clinical.parse_key_values(items)


def _clinical_paths(items: Sequence[str] | None) -> list[str]:
    return [items[0]] if items and len(items) == 1 and "=" not in items[0] else []


def _prepare_single(args: argparse.Namespace) -> list[Path]:
    """Check the single-case output folder before any work; returns the folders created."""
    from StrokePredictorLib.io import ensure_writable_dir
    from StrokePredictorLib.outputs import check_outputs_free

    if not args.dwi or not args.adc:
        raise _ArgumentError("--dwi and --adc are required for a single case (or use --isles for a batch).")
    out = Path(args.out)
    check_outputs_free(out, args.overwrite, inputs=[args.dwi, args.adc, args.flair, *_clinical_paths(args.clinical)])
    return ensure_writable_dir(out)


def _run_single(args: argparse.Namespace, predictor, what_if: dict | None = None) -> Path:  # noqa: ANN001
    from StrokePredictorLib.io import read_volume
    from StrokePredictorLib.outputs import write_outputs
    from StrokePredictorLib.preprocess import preprocess

    out = Path(args.out)
    record = _clinical_from_args(args.clinical)
    start = time.perf_counter()
    _progress(0.0, "reading images")
    dwi = read_volume(args.dwi, role="DWI")
    adc = read_volume(args.adc, role="ADC")
    flair = read_volume(args.flair, role="FLAIR") if args.flair else None
    read_s = time.perf_counter() - start
    span = 0.88 if not what_if else 0.6

    def report(f: float, m: str) -> None:
        _progress(0.02 + span * f, m)

    report(0.0, "preprocessing")
    case = preprocess(dwi, adc, flair, grid=predictor.bundle.grid, normalization=predictor.bundle.normalization,
                      progress=lambda f, m: report(0.4 * f / 0.3 if f <= 0.3 else 0.4, m))
    report(0.45, "running the network")
    encoded = predictor.encode(case)
    prediction = predictor.predict_encoded(encoded, record, progress=report, effects=args.effects)
    extra = None
    if what_if:
        from StrokePredictorLib.whatif import WhatIf, what_if_files

        _progress(0.65, "what-if scenarios")
        session = WhatIf(predictor, encoded, prediction.clinical)
        scenarios = session.scenarios(what_if)
        extra = what_if_files(scenarios, what_if, base=prediction.clinical, bundle=predictor.bundle.describe(),
                              title=Path(args.dwi).name)
    _progress(0.92, "writing outputs")
    tick = time.perf_counter()
    inputs = {"dwi": str(Path(args.dwi).resolve()), "adc": str(Path(args.adc).resolve()),
              "flair": str(Path(args.flair).resolve()) if args.flair else None}
    prediction.timings = {"read_s": read_s, **prediction.timings}
    prediction.timings["total_s"] = time.perf_counter() - start
    for warning in prediction.warnings:
        logger.warning(warning)
    summary = write_outputs(prediction, out, dwi=dwi, bundle=predictor.bundle.describe(), inputs=inputs,
                            overwrite=args.overwrite, title=Path(args.dwi).name, extra=extra)
    logger.info("Outputs written in %.2f s.", time.perf_counter() - tick)
    _progress(1.0, "done")
    return summary


def _prepare_batch(args: argparse.Namespace) -> tuple[list, dict, list[Path]]:
    """Find the cases, read and match the clinical CSV and check every output folder before any
    work. Returns the cases, the clinical records by case id and the folders created."""
    from StrokePredictorLib import clinical
    from StrokePredictorLib.io import discover_isles, ensure_writable_dir, recognised_kind
    from StrokePredictorLib.outputs import check_outputs_free

    if args.dwi or args.adc or args.flair or args.clinical:
        raise _ArgumentError("--isles cannot be combined with --dwi, --adc, --flair or --clinical.")
    cases = discover_isles(args.isles)
    records = clinical.read_csv(args.clinical_csv) if args.clinical_csv else {}
    known = {case.case_id for case in cases} | {case.case_id.removeprefix("sub-") for case in cases}
    unmatched = sorted(case_id for case_id in records if case_id not in known)
    if unmatched:
        listed = ", ".join(unmatched[:20]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        message = (f"Clinical CSV {args.clinical_csv}: {len(unmatched)} row(s) match no case in {args.isles}: "
                   f"{listed}. Case ids are the folder names (e.g. {cases[0].case_id} or "
                   f"{cases[0].case_id.removeprefix('sub-')})")
        if not args.allow_unmatched:
            raise ClinicalValueError(f"{message}; fix the ids, or pass --allow-unmatched to run anyway.")
        logger.warning("%s; running anyway (--allow-unmatched).", message)
    out = Path(args.out)
    batch_path = out / "batch_summary.json"
    if batch_path.exists() and not args.overwrite:
        raise OutputExistsError(f"{batch_path} exists already; pass --overwrite to replace it.")
    if batch_path.exists() and recognised_kind(out) != "batch":
        raise OutputExistsError(
            f"{out} holds a batch_summary.json that StrokePredictor did not write; --overwrite refused, nothing "
            "was replaced. Choose another --out."
        )
    if out.is_symlink() and not out.exists():
        raise OutputExistsError(f"--out {out} is a symbolic link to a folder that does not exist; create it or pass "
                                "another --out.")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a folder.")
    for case in cases:
        check_outputs_free(out / case.case_id, args.overwrite,
                           inputs=[case.dwi, case.adc, case.flair, args.clinical_csv])
    return cases, records, ensure_writable_dir(out)


def _run_batch(args: argparse.Namespace, predictor, cases: list, records: dict) -> tuple[Path, int]:  # noqa: ANN001
    from tqdm import tqdm

    from StrokePredictorLib import clinical
    from StrokePredictorLib.io import read_volume, write_folder_marker, write_json
    from StrokePredictorLib.outputs import write_outputs

    out = Path(args.out)
    batch_path = out / "batch_summary.json"
    results: list[dict] = []
    failures = 0
    bar = tqdm(cases, desc="cases", unit="case", disable=not sys.stderr.isatty(), file=sys.stderr)
    for number, case in enumerate(bar):
        base = number / len(cases)

        def report(f: float, m: str, base: float = base, case_id: str = case.case_id) -> None:
            _progress(base + f / len(cases), f"{case_id}: {m}")

        try:
            record = records.get(case.case_id) or records.get(case.case_id.removeprefix("sub-"))
            extra = []
            if record is None:
                if args.clinical_csv:
                    extra.append(f"Case {case.case_id} has no row in the clinical CSV {Path(args.clinical_csv).name}; "
                                 "its clinical values are missing (age and sex from the image sidecar if present).")
                sidecar = {"age": case.age, "sex": case.sex}
                record = clinical.validate({k: v for k, v in sidecar.items() if v is not None},
                                           where=f"{case.case_id} sidecar: ")
            dwi = read_volume(case.dwi, role="DWI")
            adc = read_volume(case.adc, role="ADC")
            flair = read_volume(case.flair, role="FLAIR") if case.flair else None
            prediction = predictor.predict(dwi, adc, flair, record, progress=report)
            prediction.warnings = extra + prediction.warnings
            for warning in prediction.warnings:
                logger.warning("%s: %s", case.case_id, warning)
            inputs = {"case_id": case.case_id, "dwi": str(case.dwi), "adc": str(case.adc),
                      "flair": str(case.flair) if case.flair else None}
            summary = write_outputs(prediction, out / case.case_id, dwi=dwi, bundle=predictor.bundle.describe(),
                                    inputs=inputs, overwrite=args.overwrite, title=case.case_id)
            results.append({"case_id": case.case_id, "summary": str(summary), "error": None,
                            "lesion_volume_ml": prediction.volume_ml, "warnings": prediction.warnings})
        except StrokePredictorError as error:
            failures += 1
            message = " ".join(str(error).split())
            print(f"error: {case.case_id}: {message}", file=sys.stderr, flush=True)
            results.append({"case_id": case.case_id, "summary": None, "error": message, "warnings": []})
    data = {"cases": results, "n_cases": len(cases), "n_failed": failures,
            "n_with_warnings": sum(bool(r["warnings"]) for r in results),
            "bundle": predictor.bundle.describe(), "clinical_csv": args.clinical_csv}
    write_folder_marker(out, "batch", "python -m StrokePredictorLib.predict --isles")
    write_json(data, batch_path, overwrite=args.overwrite)
    _progress(1.0, "done")
    return batch_path, failures


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that every ``finally`` cleans up as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:  # noqa: ARG001
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except StrokePredictorError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    created: list[Path] = []
    try:
        if not args.isles and args.clinical_csv:
            raise _ArgumentError("--clinical-csv is for batch mode (--isles); use --clinical for a single case.")
        if args.allow_unmatched and not args.clinical_csv:
            raise _ArgumentError("--allow-unmatched only applies with --clinical-csv.")
        what_if = None
        if args.what_if:
            if args.isles:
                raise _ArgumentError("--what-if is for a single case (--dwi/--adc), not for --isles batches.")
            from StrokePredictorLib.whatif import parse_what_if

            what_if = parse_what_if(args.what_if)
        if not 1 <= args.mc_samples <= MAX_MC_SAMPLES:
            raise _ArgumentError(f"--mc-samples must lie between 1 and {MAX_MC_SAMPLES}, got {args.mc_samples}.")
        if not 0 <= args.seed <= 2**63 - 1:
            raise _ArgumentError(f"--seed must lie between 0 and 2**63 - 1, got {args.seed}.")
        from StrokePredictorLib.bundle import resolve_device

        resolve_device(args.device)
        # Everything that can be checked without computing is checked first: the output folder.
        if args.isles:
            cases, records, created = _prepare_batch(args)
        else:
            created = _prepare_single(args)
        from StrokePredictorLib.bundle import default_bundle_dir
        from StrokePredictorLib.inference import Predictor

        predictor = Predictor(
            args.bundle or default_bundle_dir("acute"), device=args.device, mc_samples=args.mc_samples,
            seed=args.seed, threshold=args.threshold, deterministic=args.deterministic,
            min_component_ml=args.min_component_ml, flip_tta=args.tta, max_component_adc=args.max_component_adc,
            feature_effects=args.effects,
        )
        if args.isles:
            result, failures = _run_batch(args, predictor, cases, records)
            created = []
            print(f"RESULT {result}", flush=True)
            return 2 if failures else 0
        result = _run_single(args, predictor, what_if)
        created = []
        print(_describe(Path(result)), flush=True)
        print(f"RESULT {result}", flush=True)
        return 0
    except StrokePredictorError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except _Terminated:
        print("error: terminated (SIGTERM); temporary files removed", file=sys.stderr, flush=True)
        return 143
    finally:
        if created:  # the run created --out and did not finish: take the empty folders back
            from StrokePredictorLib.io import remove_created_dirs

            remove_created_dirs(created)
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
