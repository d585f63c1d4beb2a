"""Training speed: slices per second of one MMgSN-Net + PatchGAN step (L1 + LSGAN, Adam) at
256 x 224, for the full model and the small variant, on CPU (and CUDA when present, with the
trainer's mixed precision).

    python benchmarks/training.py [--batch 4] [--steps 5] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.machine import describe
from synthesis.inference import resolve_device
from synthesis.models import build, parameter_count
from training import PairedObjective, autocast_for


def step_time(width: float, batch: int, steps: int, device: torch.device,
              amp: bool = True) -> float:
    """Median seconds of one training step of vcemri train's paired objective (the trainer's
    own code: mixed precision on CUDA unless ``amp`` is off)."""
    torch.manual_seed(0)
    generator = build("mmgsn", width_multiplier=width, output="linear").to(device)
    discriminator = build("patchgan", width_multiplier=width).to(device)
    autocast, dtype = autocast_for(device, amp)
    objective = PairedObjective(generator, discriminator, [0, 1], l1_weight=100.0,
                                adversarial_weight=1.0, learning_rate=2e-4, autocast=autocast,
                                scaling=dtype == torch.float16, world=1, device=device)
    x = torch.randn(batch, 2, 256, 224, device=device)
    y = torch.randn(batch, 1, 256, 224, device=device)
    times = []
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        objective.step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(describe(("torch", "numpy")))
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch {args.batch}, "
          f"median of {args.steps} steps")
    print(f"{'model':<7} {'params':>10} {'s/step':>8} {'slices/s':>9}")
    for name, width in (("small", 0.25), ("full", 1.0)):
        seconds = step_time(width, args.batch, args.steps, device, amp=not args.no_amp)
        params = parameter_count(build("mmgsn", width_multiplier=width))
        print(f"{name:<7} {params:>10,} {seconds:>8.2f} {args.batch / seconds:>9.2f}")


if __name__ == "__main__":
    main()
