"""``python -m Training synthpack``: build the GPU synthesis pack and the held-out lesion folder.

    python -m Training synthpack --soop ../shared/data/soop --out pack.npz [--heldout-dir DIR]

The pack (:mod:`Training.synthesis.gpu_synth`) holds the 2 mm MNI tissue maps and every SOOP lesion with
its participant's clinical values; 15% of the participants (by a hash of their id) are held out
(5% validation, 10% test).
``--heldout-dir`` writes a SOOP-shaped folder (links to the held-out lesion files of
``--heldout-split``, ``test`` or ``val``, plus ``participants.tsv``) that
``python -m Training generate --lesions DIR`` can use to build test or validation cases whose
lesions the network never saw.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from Training import config as cfg
from Training.synthesis.gpu_synth import build_pack, participant_split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthPackConfig:
    soop: Path = field(default=Path("../shared/data/soop"), metadata={"help": "SOOP lesion library folder"})
    out: Path = field(default=Path("pack.npz"), metadata={"help": "pack file to write"})
    workers: int = field(default=2, metadata={"help": "processes reading lesion masks"})
    heldout_dir: Path | None = field(default=None,
                                      metadata={"help": "also write a SOOP-shaped folder of held-out lesions"})
    heldout_split: str = field(default="test", metadata={"help": "which held-out participants: test or val"})
    skip_pack: bool = field(default=False, metadata={"help": "only write --heldout-dir"})


def write_heldout_dir(soop: Path, out: Path, split: str = "test") -> int:
    """Link the lesion files of the ``split`` participants (test or val) into ``out`` (copy where
    links fail)."""
    if split not in ("test", "val"):
        raise ValueError(f"heldout_split must be 'test' or 'val', got '{split}'")
    (out / "lesions").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(soop / "participants.tsv", out / "participants.tsv")
    count = 0
    for path in sorted((soop / "lesions").glob("bwsrsub-*_lesion.nii.gz")):
        participant = "sub-" + path.name[len("bwsrsub-"):-len("_lesion.nii.gz")]
        if participant_split(participant) != split:
            continue
        target = out / "lesions" / path.name
        if not target.exists():
            try:
                os.symlink(path.resolve(), target)
            except OSError:
                shutil.copyfile(path, target)
        count += 1
    return count


def main(argv: list[str]) -> int:
    config = cfg.parse(SynthPackConfig, argv, __doc__.splitlines()[0], prog="python -m Training synthpack")
    if not config.skip_pack:
        build_pack(config.soop, config.out, workers=config.workers)
        print(f"wrote {config.out}")
    if config.heldout_dir is not None:
        count = write_heldout_dir(config.soop, config.heldout_dir, config.heldout_split)
        print(f"wrote {count} held-out {config.heldout_split} lesions to {config.heldout_dir}")
    return 0
