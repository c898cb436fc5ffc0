"""Training throughput: the real data loader against the model-only step rate.

Measures on one machine, with the same batch size and input size:

1. **model only**: :func:`Training.training.train.training_step` on one batch already on the device;
2. **loader**: the real path of ``python -m Training train`` (memory-mapped cache, DataLoader
   workers, pinned memory, replayable stream sampler, augmentation on the device) feeding the
   same step;
3. on CUDA also MONAI's DynUNet at the same input size, model only.

Target: the loader keeps at least 90% of the model-only rate. Prints the machine, the command,
per-step medians and the ratio, and writes them as JSON.

    python Testing/benchmarks/bench_train.py --device cpu --grid-size 48,48,48 --grid-spacing 4,4,4
    python Testing/benchmarks/bench_train.py --device cuda --batch-size 4 --workers 8   # lite grid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from Training.training.train import TrainConfig, network_config, training_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _machine(device: torch.device) -> str:
    text = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch {torch.__version__}, "
    text += f"{torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def _step_times(step, device: torch.device, steps: int, warmup: int) -> list[float]:  # noqa: ANN001
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - tick)
    return times


def _dataset(args: argparse.Namespace, work: Path) -> Path:
    from training_fixtures import write_isles_phantom

    from Training.data.cache import CacheConfig, build_cache

    if args.cache:
        return Path(args.cache)
    data = Path(args.data) if args.data else None
    if data is None:
        data = work / "data"
        if args.generator:
            from Training.synthesis.generate import write_tiny_dataset

            write_tiny_dataset(data, n_cases=args.cases, seed=0)
        else:
            write_isles_phantom(data, n_cases=args.cases, seed=0)
    grid = {"grid_size": tuple(args.grid_size), "grid_spacing": tuple(args.grid_spacing)} if args.grid_size else {}
    tick = time.perf_counter()
    build_cache(CacheConfig(data=data, out=work / "cache", preset=args.preset, workers=args.workers or 1,
                            progress=False, **grid))
    print(f"cache: {args.cases} cases preprocessed in {time.perf_counter() - tick:.1f} s")
    return work / "cache"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--grid-size", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--grid-spacing", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 2.0, 2.0])
    parser.add_argument("--data", help="ISLES-layout folder (default: a generated phantom)")
    parser.add_argument("--cache", help="existing training cache (skips preprocessing)")
    parser.add_argument("--generator", action="store_true", help="use Training.synthesis.generate.write_tiny_dataset")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from monai.losses import DiceCELoss

    from StrokePredictorLib.network import StrokeNet
    from Training.data.dataset import AugmentConfig, CacheDataset, StreamSampler, load_split, make_loader

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    print(f"machine: {_machine(device)}")
    print(f"command: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    with tempfile.TemporaryDirectory() as temporary:
        cache = _dataset(args, Path(temporary))
        split = load_split(cache)
        config = TrainConfig(cache=cache, preset=args.preset, batch_size=args.batch_size)
        model = StrokeNet(network_config(config)).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        loss_fn = DiceCELoss(sigmoid=True)
        autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": cuda}
        dataset = CacheDataset(cache, split["train"] + split["val"] + split["test"], "acute",
                               augment=AugmentConfig(), seed=0)
        shape = dataset.size_kji
        kwargs = dict(device=device, autocast=autocast, grad_clip=1.0, channels_last=cuda)

        # 1. model only: one batch (no augmentation), already on the device
        sampler = StreamSampler(len(dataset), args.batch_size, seed=0)
        sampler.set_range(0, 1)
        fixed = next(iter(make_loader(CacheDataset(cache, dataset.case_ids, "acute"),
                                      sampler=[c for c, _ in sampler], batch_size=args.batch_size)))
        fixed = {k: v.to(device) for k, v in fixed.items()}
        model_only = _step_times(lambda: training_step(model, fixed, optimizer, scaler, loss_fn, **kwargs),
                                 device, args.steps, args.warmup)

        # 2. the real loader (+ augmentation on the device)
        total = args.warmup + args.steps
        sampler.set_range(0, total)
        loader = make_loader(dataset, sampler=sampler, batch_size=args.batch_size, workers=args.workers,
                             pin_memory=cuda, prefetch=4)
        iterator = iter(loader)
        loader_times = []
        window_start = 0.0
        for index in range(total):
            if index == args.warmup:
                _sync(device)
                window_start = time.perf_counter()
            tick = time.perf_counter()
            training_step(model, next(iterator), optimizer, scaler, loss_fn, **kwargs)
            _sync(device)
            if index >= args.warmup:
                loader_times.append(time.perf_counter() - tick)
        window = time.perf_counter() - window_start
        del iterator

        results: dict = {
            "machine": _machine(device),
            "command": " ".join(sys.argv),
            "input": [args.batch_size, 3, *shape],
            "preset": args.preset,
            "workers": args.workers,
            "model_only_step_s_median": statistics.median(model_only),
            "loader_step_s_median": statistics.median(loader_times),
            "loader_steps_per_s_window": args.steps / window,
        }
        results["ratio_median"] = results["model_only_step_s_median"] / results["loader_step_s_median"]
        results["ratio_window"] = results["loader_steps_per_s_window"] * results["model_only_step_s_median"]

        # 3. MONAI DynUNet at the same input size (CUDA only: too slow to be useful on a CPU)
        if cuda:
            from monai.networks.nets import DynUNet

            dyn = DynUNet(3, 3, 1, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2, 2, 2, 2],
                          norm_name="instance").to(device).to(memory_format=torch.channels_last_3d)
            dyn_optimizer = torch.optim.AdamW(dyn.parameters(), lr=1e-4, fused=True)
            image = fixed["image"].contiguous(memory_format=torch.channels_last_3d)

            def dyn_step() -> None:
                with torch.autocast(**autocast):
                    logits = dyn(image)
                loss = loss_fn(logits.float(), fixed["target"])
                dyn_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                dyn_optimizer.step()

            results["dynunet_step_s_median"] = statistics.median(_step_times(dyn_step, device, args.steps, args.warmup))
            results["dynunet_parameters"] = sum(p.numel() for p in dyn.parameters())
        results["strokenet_parameters"] = sum(p.numel() for p in model.parameters())

    print(f"input {results['input']} ({args.preset}), batch {args.batch_size}, workers {args.workers}")
    print(f"model only : {results['model_only_step_s_median'] * 1000:8.1f} ms/step (median of {args.steps})")
    print(f"loader     : {results['loader_step_s_median'] * 1000:8.1f} ms/step (median), "
          f"{results['loader_steps_per_s_window']:.2f} steps/s over the window")
    print(f"ratio      : {results['ratio_median']:.1%} (median), {results['ratio_window']:.1%} (window); target >= 90%")
    if "dynunet_step_s_median" in results:
        print(f"DynUNet    : {results['dynunet_step_s_median'] * 1000:8.1f} ms/step (model only, same input)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
