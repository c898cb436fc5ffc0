"""GPU benchmark of the network and the training data path (no SimpleITK needed).

Measures, on the current CUDA device (or the CPU with ``--device cpu``, for a dry run):

1. inference of the ``lite`` network on the ISLES-sized model grid (96x112x80 at 2 mm): one
   deterministic pass against the pass plus 20 Monte-Carlo samples (bf16 autocast);
2. training steps per second, model only (batch already on the device) against the full data
   path (label workers + GPU synthesis, :mod:`Training.synthesis.gpu_synth`), and MONAI's DynUNet at the
   same input size, model only.

Prints medians and writes them as JSON.

    python Testing/benchmarks/bench_gpu.py --pack pack.npz --out gpu_benchmark.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from StrokePredictorLib.network import NetworkConfig, StrokeNet  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(function, device: torch.device, repeats: int, warmup: int = 3) -> list[float]:  # noqa: ANN001
    for _ in range(warmup):
        function()
    _sync(device)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _sync(device)
        timings.append(time.perf_counter() - start)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--grid", default="96,112,80", help="model grid i,j,k")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = tuple(int(v) for v in args.grid.split(","))
    shape = (size[2], size[1], size[0])
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    results: dict = {
        "machine": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "grid": list(size), "batch_size": args.batch_size,
        "command": " ".join(sys.argv),
    }

    model = StrokeNet(NetworkConfig.lite()).to(device).eval()
    image = torch.rand((1, 3, *shape), device=device)
    values, missing = torch.zeros((1, 10), device=device), torch.zeros((1, 10), dtype=torch.bool, device=device)
    present = torch.ones(1, dtype=torch.bool, device=device)

    def single() -> None:
        with torch.inference_mode(), autocast:
            model(image, values, missing, present)

    def mc20() -> None:
        with torch.inference_mode(), autocast:
            features = model.features(image, values, missing, present)
            model.sample_logits(features["features"], 20)

    single_t = _time(single, device, args.repeats)
    mc_t = _time(mc20, device, args.repeats)
    results["inference_single_pass_s"] = statistics.median(single_t)
    results["inference_20_mc_s"] = statistics.median(mc_t)
    results["mc_ratio"] = results["inference_20_mc_s"] / results["inference_single_pass_s"]

    from monai.losses import DiceCELoss
    from monai.networks.nets import DynUNet

    loss_fn = DiceCELoss(sigmoid=True)
    batch_image = torch.rand((args.batch_size, 3, *shape), device=device)
    target = (torch.rand((args.batch_size, 1, *shape), device=device) > 0.98).float()
    b_values = torch.zeros((args.batch_size, 10), device=device)
    b_missing = torch.zeros((args.batch_size, 10), dtype=torch.bool, device=device)
    b_present = torch.ones(args.batch_size, dtype=torch.bool, device=device)
    train_model = StrokeNet(NetworkConfig.lite()).to(device).train()
    optimizer = torch.optim.AdamW(train_model.parameters(), lr=1e-3)

    def step(batch: torch.Tensor, tgt: torch.Tensor, vals: torch.Tensor, miss: torch.Tensor,
             pres: torch.Tensor) -> None:
        with autocast:
            loss = loss_fn(train_model(batch, vals, miss, pres)["logits"].float(), tgt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model_only = _time(lambda: step(batch_image, target, b_values, b_missing, b_present), device, args.repeats)
    results["train_model_only_steps_per_s"] = 1 / statistics.median(model_only)

    from Training.synthesis.gpu_synth import GpuSynthesizer, LabelSampler, Pack

    pack = Pack.load(args.pack)
    synth = GpuSynthesizer(pack, size, device)
    generator = torch.Generator(device=device).manual_seed(0)
    loader = torch.utils.data.DataLoader(LabelSampler(pack, seed=1, length=10**6), batch_size=args.batch_size // 2,
                                         num_workers=args.workers, pin_memory=cuda,
                                         persistent_workers=args.workers > 0)
    iterator = iter(loader)

    def data_step() -> None:
        labels = next(iterator)
        labels = {k: v.repeat_interleave(2, dim=0) for k, v in labels.items()}
        batch = synth(labels, generator)
        step(batch["image"], batch["acute"], batch["clinical_values"], batch["clinical_missing"],
             batch["flair_present"])

    with_data = _time(data_step, device, args.repeats, warmup=5)
    results["train_with_synthesis_steps_per_s"] = 1 / statistics.median(with_data)
    results["loader_keeps_fraction"] = results["train_with_synthesis_steps_per_s"] / results[
        "train_model_only_steps_per_s"]

    dynunet = DynUNet(3, 3, 1, kernel_size=[3, 3, 3, 3, 3], strides=[1, 2, 2, 2, 2],
                      upsample_kernel_size=[2, 2, 2, 2]).to(device).train()
    dyn_optimizer = torch.optim.AdamW(dynunet.parameters(), lr=1e-3)

    def dyn_step() -> None:
        with autocast:
            loss = loss_fn(dynunet(batch_image), target)
        dyn_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dyn_optimizer.step()

    results["dynunet_model_only_steps_per_s"] = 1 / statistics.median(_time(dyn_step, device, args.repeats))
    results["dynunet_parameters_m"] = sum(p.numel() for p in dynunet.parameters()) / 1e6
    results["strokenet_lite_parameters_m"] = sum(p.numel() for p in train_model.parameters()) / 1e6
    print(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
