"""Two training steps of every generator ``vcemri train`` can train, under DistributedDataParallel:
run by ``torchrun --standalone --nproc-per-node 2 tests/support/ddp_steps.py OUT.json`` (gloo
on CPU). Each rank feeds its own random slices through the trainer's own objective (as
``vcemri train`` builds it); DDP fails on the second step if a model left parameters out of
the first. Rank 0 writes, per architecture, both ranks' parameter checksums and which
generator parameters never changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import synthesis  # noqa: E402
from training.trainer import (  # noqa: E402
    TrainOptions,
    build_generator,
    build_objective,
    setup_distributed,
)

#: Every trainable generator, and the MMgSN-Net ablations (parts of the model switched off).
RUNS: dict[str, dict] = {
    "mmgsn": {},
    "mmgsn-ablations": {"fusion": "concat", "multi_level": False, "attention": False},
    "mmgsn-micro-batches": {"micro_batches": 2},
    "unet": {"architecture": "unet", "inputs": ("t1w",)},
    "hinet": {"architecture": "hinet"},
    "important": {"architecture": "important"},
    "important-dropout": {"architecture": "important", "modality_dropout": 0.9},
    "pix2pix": {"architecture": "pix2pix"},
    "cyclegan": {"architecture": "cyclegan", "inputs": ("t2w",)},
}
STEPS = 2
SIZE = (64, 64)


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for value in model.parameters():  # BatchNorm statistics stay per rank (not synced)
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out: Path) -> int:
    place, device = setup_distributed("cpu")
    report: dict[str, dict] = {}
    for name, extra in RUNS.items():
        options = TrainOptions(width=0.125, device="cpu", batch_size=2, fitness_steps=0,
                               **extra)
        torch.manual_seed(0)  # the same initial weights on both ranks
        generator = build_generator(options).to(device)
        discriminator = synthesis.build_model(
            "patchgan", width_multiplier=options.width,
            conditional=options.architecture != "cyclegan").to(device)
        channels = [("t1w", "t2w").index(m)
                    for m in getattr(generator, "inputs", ("t1w", "t2w"))]
        before = {k: v.detach().clone() for k, v in generator.named_parameters()}
        objective = build_objective(options, generator, discriminator, channels, device,
                                    place.world, None, False)
        data = torch.Generator().manual_seed(100 + place.rank)  # each rank its own slices
        for _ in range(STEPS):
            x = torch.randn(2, 2, *SIZE, generator=data)
            y = torch.randn(2, 1, *SIZE, generator=data)
            unpaired = torch.randn(2, 1, *SIZE, generator=data) if objective.unpaired else None
            objective.step(x, y, unpaired)
        sums: list[str | None] = [None] * place.world
        dist.all_gather_object(sums, checksum(generator))
        frozen = [k for k, v in generator.named_parameters() if torch.equal(v, before[k])]
        report[name] = {"steps": STEPS, "rank_checksums": sums, "unchanged": frozen,
                        "losses": list(objective.losses)}
    if place.main:
        out.write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
