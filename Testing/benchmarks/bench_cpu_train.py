"""CPU training throughput of the synthetic-pool recipe (``train-synth --source pool``).

Measures on this machine, batch 2 x 3 x 64^3 patches of the lite network (a fine-tune's step:
forward, Dice + BCE, backward, AdamW):

1. **model only**, up to four ways (``--modes``): fp32, fp32 channels-last-3d, bf16 autocast, bf16 +
   channels-last;
2. **pool step**: the real loop's data path (:class:`Training.synthesis.pool.SynthPool` with its paced
   background renderer, lesion-centred patches, cheap re-augmentation) feeding the recipe's step
   (``--precision auto``: bf16 where the CPU has it natively, else fp32; channels-last); reports the share
   of step time spent in the network (goal: at least 85% on 2 cores) and the step against the model-only
   one (the renderer competes for the cores);
3. **inference**: one whole-grid forward pass (80 x 112 x 96), fp32 against bf16.

The JSON records whether the CPU has native bf16 (``Training.training.loop.native_bf16``): without it
(AVX2 but no AVX-512), bf16 is emulated about 20 times slower than fp32, so leave the bf16 modes out
there (``--modes fp32,fp32_channels_last``) unless that is what is measured.

Prints the machine, the command and per-step medians, and writes them as JSON.

    python Testing/benchmarks/bench_cpu_train.py --pack pack.npz [--steps 20] [--out bench_cpu_train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from StrokePredictorLib.network import NetworkConfig, StrokeNet  # noqa: E402
from Training.training.loop import native_bf16  # noqa: E402
from Training.training.train_synth import resolve_precision  # noqa: E402

MODES = {"fp32": (False, False), "fp32_channels_last": (False, True), "bf16": (True, False),
         "bf16_channels_last": (True, True)}


def _step_fn(model: StrokeNet, optimizer: torch.optim.Optimizer, loss_fn, bf16: bool, channels_last: bool):  # noqa: ANN001, ANN202
    def step(batch: dict[str, torch.Tensor]) -> None:
        image = batch["image"]
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with context:
            out = model(image, batch["clinical_values"], batch["clinical_missing"], batch["flair_present"],
                        batch.get("window"))
        loss = loss_fn(out["logits"].float(), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _median_time(fn, batches: list, warmup: int = 2) -> float:  # noqa: ANN001
    times = []
    for n, batch in enumerate(batches):
        tic = time.perf_counter()
        fn(batch)
        if n >= warmup:
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", required=True, help="synthesis pack (python -m Training synthpack)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="bench_cpu_train.json")
    parser.add_argument("--pause", type=float, default=6.0, help="the pool renderer's pause (train-synth --pool-pause)")
    parser.add_argument("--modes", default=",".join(MODES), help="model-only modes, comma-separated")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    from monai.losses import DiceCELoss

    from Training.synthesis.pool import SynthPool

    torch.manual_seed(0)
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    patch = (64, 64, 64)
    pool = SynthPool(args.pack, (96, 112, 80), size=8, seed=0, background=True, pause=args.pause)
    try:
        fixed = pool.batch(2, patch)
        results: dict = {"model_only_s": {}}
        for name in modes:
            bf16, channels_last = MODES[name]
            model = StrokeNet(NetworkConfig.lite()).train()
            if channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            step = _step_fn(model, optimizer, loss_fn, bf16, channels_last)
            results["model_only_s"][name] = round(_median_time(step, [fixed] * (args.steps // 2 + 2)), 3)
            print(f"model only, {name}: {results['model_only_s'][name]:.3f} s/step", flush=True)

        recipe = resolve_precision("auto", torch.device("cpu"))  # what train-synth uses here
        model = StrokeNet(NetworkConfig.lite()).train().to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = _step_fn(model, optimizer, loss_fn, recipe.name == "bf16", True)
        results["recipe_precision"] = recipe.name
        totals, nets = [], []
        for n in range(args.steps + 2):
            tic = time.perf_counter()
            pool.refresh(1)
            batch = pool.batch(2, patch)
            mid = time.perf_counter()
            step(batch)
            toc = time.perf_counter()
            if n >= 2:
                totals.append(toc - tic)
                nets.append(toc - mid)
        results["pool_step_s"] = round(statistics.median(totals), 3)
        results["network_share"] = round(sum(nets) / sum(totals), 3)
        results["pool_refreshed"] = pool.refreshed
        print(f"pool step ({recipe.name}): {results['pool_step_s']:.3f} s, network share "
              f"{results['network_share']:.1%}, {pool.refreshed} volumes refreshed", flush=True)

        model.eval()
        full = {"image": torch.rand(1, 3, 80, 112, 96), "clinical_values": torch.zeros(1, 10),
                "clinical_missing": torch.ones(1, 10, dtype=torch.bool),
                "flair_present": torch.ones(1, dtype=torch.bool)}
        results["inference_s"] = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            if bf16 and not any(MODES[m][0] for m in modes):
                continue
            def forward(batch: dict, bf16: bool = bf16) -> None:
                with torch.no_grad(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()):
                    model.features(batch["image"], batch["clinical_values"], batch["clinical_missing"],
                                   batch["flair_present"])
            results["inference_s"][name] = round(_median_time(forward, [full] * 7), 3)
            print(f"whole-grid forward, {name}: {results['inference_s'][name]:.3f} s", flush=True)
    finally:
        pool.close()
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "native_bf16": native_bf16(torch.device("cpu"))}
    results["command"] = " ".join(["python", *sys.argv])
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
