"""MMgSN-Net inference speed at 256 x 224: ms per slice, peak memory, FLOPs per slice and the
fraction of the device's peak arithmetic it reaches; the full model and the small variant.

    python benchmarks/inference.py [--batch 8] [--repeats 5] [--device auto] [--grid 256x224]

``--grid 288x288``: the canvas of a model trained at 0.8 mm on 230 mm fields
(``vcemri train --spacing-mm 0.8``); the bottleneck's self-attention grows with the square of
its pixel count, so time grows faster than the pixels.

CPU peak = cores x clock x FLOPs per cycle (32 fp32 with AVX2 FMA, 64 with AVX-512), an
estimate; on CUDA, the device's bf16 tensor-core peak is not known here, so the achieved
TFLOP/s are printed instead.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import describe
from synthesis.inference import Predictor, resolve_device
from synthesis.models import build, parameter_count

VARIANTS = {"small": 0.25, "full": 1.0}  # small first: CPU peak RSS only grows


def _cpu_peak_gflops() -> float:
    flags, mhz = "", 0.0
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("flags") and not flags:
                flags = line
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":")[1])
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    return torch.get_num_threads() * mhz / 1000 * per_cycle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--grid", default="256x224", metavar="ROWSxCOLS",
                        help="the slice size the network runs on (multiples of 32)")
    args = parser.parse_args()
    rows, columns = (int(v) for v in args.grid.lower().split("x"))
    device = resolve_device(args.device)
    print(describe(("torch", "numpy")))
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch {args.batch}, "
          f"slices {rows} x {columns}")
    peak = _cpu_peak_gflops() if device.type == "cpu" else None
    if peak:
        print(f"estimated CPU peak: {peak:.0f} GFLOP/s fp32")
    print(f"{'model':<7} {'params':>10} {'GFLOP/slice':>12} {'ms/slice':>9} {'GFLOP/s':>8} "
          f"{'% peak':>7} {'peak MiB':>9}")
    for name, width in VARIANTS.items():
        model = build("mmgsn", width_multiplier=width, output="linear").eval()
        x = torch.randn(1, 2, rows, columns)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x)
        flops = counter.get_total_flops()
        predictor = Predictor(model, device, args.batch)
        inputs = torch.randn(args.batch, 2, rows, columns).numpy()
        predictor.predict(inputs)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            predictor.predict(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / args.batch)
        per_slice = statistics.median(times)
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**20
        else:
            memory = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, before) / 1024
        achieved = flops / per_slice / 1e9
        share = f"{100 * achieved / peak:6.1f}%" if peak else "    n/a"
        print(f"{name:<7} {parameter_count(model):>10,} {flops / 1e9:>12.2f} "
              f"{per_slice * 1000:>9.1f} {achieved:>8.1f} {share:>7} {memory:>9.0f}")
    print("ms/slice: median of the repeats; peak MiB: process max RSS on CPU (includes "
          "Python and torch), allocator peak on CUDA")


if __name__ == "__main__":
    main()
