"""The training package's commands: ``vcemri simulate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .institutions import INSTITUTIONS


def _institutions(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in INSTITUTIONS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown institution {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(INSTITUTIONS)}"
        )
    return keys


def _advance(bar: Any, patient: str) -> None:
    bar.set_postfix_str(patient)
    bar.update(1)


def _institution_list(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise argparse.ArgumentTypeError("name at least one institution")
    return keys


def _simulate(args: argparse.Namespace) -> int:
    # Imported here: the simulator pulls in highdicom and SimpleITK, which every other
    # vcemri command would otherwise pay for at start-up.
    from tqdm import tqdm

    from .simulate import SimulationOptions, check_output_directory, simulate_cohort

    options = SimulationOptions(
        institutions=args.institutions,
        patients_per_institution=args.patients_per_institution,
        seed=args.seed,
        matrix_scale=args.matrix_scale,
        slices=args.slices,
        misalign_mm=args.misalign,
    )
    check_output_directory(Path(args.out), args.overwrite)
    total = len(options.institutions) * options.patients_per_institution
    with tqdm(total=total, unit="patient", desc="simulating", file=sys.stderr,
              disable=args.quiet) as bar:
        records = simulate_cohort(
            Path(args.out), options, preview=args.preview, workers=args.workers,
            overwrite=args.overwrite,
            progress=lambda record: _advance(bar, record.patient),
        )
    volumes = sorted(r.tumour_volume_ml for r in records)
    print(f"simulated {len(records)} patients from {len(options.institutions)} institutions "
          f"into {args.out}")
    print(f"manifest: {Path(args.out) / 'manifest.csv'}")
    print(f"tumour volumes: {volumes[0]:.1f}-{volumes[-1]:.1f} ml")
    if args.preview:
        print(f"preview: {Path(args.out) / 'preview.png'}")
    return 0


def _modalities(text: str) -> tuple[str, ...]:
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    if not values or any(v not in ("t1w", "t2w") for v in values) or len(set(values)) < len(
            values):
        raise argparse.ArgumentTypeError(f"{text!r}: give t1w, t2w or t1w,t2w")
    return values


def _crop(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxCOLS, e.g. 128x112") from None
    if rows < 32 or cols < 32 or rows % 16 or cols % 16:
        raise argparse.ArgumentTypeError(
            f"{text!r}: rows and columns must be multiples of 16, at least 32 (the network "
            "halves the image four times)")
    return rows, cols


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .trainer import TrainOptions, train

    options = TrainOptions(
        institutions=args.institutions, epochs=args.epochs, batch_size=args.batch_size,
        width=args.width, seed=args.seed, device=args.device, max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every, crop=args.crop, architecture=args.architecture,
        inputs=args.inputs, fusion=args.fusion, multi_level=not args.no_multi_level,
        attention=not args.no_attention, amp=not args.no_amp, l1_weight=args.l1_weight,
        adversarial_weight=args.adversarial_weight, cycle_weight=args.cycle_weight,
        decay_epochs=args.decay_epochs,
        learning_rate=args.learning_rate, init=args.init)
    bar = tqdm(unit="step", desc="training", file=sys.stderr,
               disable=args.quiet or int(os.environ.get("RANK", "0")) != 0)

    def progress(stage: str, values: dict[str, Any]) -> None:
        if stage == "prepare":
            bar.set_description(f"preparing {values['patient']}")
            return
        bar.set_description(f"epoch {values['epoch']}/{args.epochs}")
        shown = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in values.items()
                 if k in ("loss_l1", "loss_cycle", "loss_d")}
        bar.set_postfix(shown)
        bar.update(1)

    with bar:
        result = train(Path(args.manifest), Path(args.out), options, progress,
                       resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 reports
    print(f"model: {result.checkpoint} ({result.steps} steps, {result.seconds:.0f} s)")
    print(f"split: {len(result.split['train'])} training, {len(result.split['internal'])} "
          f"internal, {len(result.split['external'])} external patients "
          f"({Path(args.out) / 'split.json'})")
    print(f"internal L1 (normalised units): model {result.metrics['internal_l1_normalised']:.4f}, "
          f"'VCE = T1w' {result.metrics['internal_l1_t1w_copy_normalised']:.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .evaluate import evaluate, write

    with tqdm(unit="patient", desc="evaluating", file=sys.stderr, disable=args.quiet) as bar:
        models = dict(_model_argument(m) for m in args.model)
        if len(models) == 1 and not any("=" in m for m in args.model):
            models = {"model": next(iter(models.values()))}
        evaluation = evaluate(models, Path(args.manifest),
                              tuple(args.groups.split(",")), args.device,
                              progress=lambda patient: bar.update(1))
    if not evaluation.rows:
        from config import InputError

        raise InputError(f"no patients of the groups {args.groups} in {args.manifest}")
    written = write(evaluation, Path(args.out))
    print(evaluation.markdown, end="")
    print(f"written: {written['csv']}, {written['markdown']}, {written['significance']} and "
          f"{written['html']} (with {len(written) - 4} figures)")
    return 0


def _model_argument(text: str) -> tuple[str, Path]:
    label, _, path = text.rpartition("=")
    return (label or Path(path).parent.name or Path(path).stem), Path(path)


def _default_workers() -> int:
    """Processes for simulation: the CPUs this process may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def add_commands(commands: Any) -> None:
    """Add ``simulate`` to the ``vcemri`` sub-command parser."""
    parser = commands.add_parser(
        "simulate",
        help="simulate a multi-institution NPC cohort as DICOM (T1w, T2w, CE-T1w, tumour)",
        description="Simulate head-and-neck MR of NPC patients at several institutions and "
        "write DICOM series, ground-truth tumour masks (NIfTI and DICOM SEG) and a manifest.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--institutions", type=_institutions, default=tuple(INSTITUTIONS), metavar="LIST",
        help=f"comma-separated institution keys (default: all of {','.join(INSTITUTIONS)})",
    )
    parser.add_argument("--patients-per-institution", type=int, default=5, metavar="N",
                        help="patients simulated at each institution (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--matrix-scale", type=float, default=1.0, metavar="F",
                        help="scale every matrix by F keeping the field of view "
                        "(e.g. 0.5 for small test cohorts; default 1)")
    parser.add_argument("--slices", type=int, default=None, metavar="N",
                        help="slices per series (default: ~120 mm of coverage)")
    parser.add_argument("--misalign", type=float, default=0.0, metavar="MM",
                        help="move the patient up to MM mm (MM/2 degrees) between series")
    parser.add_argument("--preview", action="store_true",
                        help="write preview.png: one patient per institution")
    parser.add_argument("--workers", type=int, default=_default_workers(), metavar="N",
                        help="parallel processes (default: CPUs, at most 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_simulate)

    trainer = commands.add_parser(
        "train",
        help="train MMgSN-Net on a multi-institution manifest and save a checkpoint",
        description="Train MMgSN-Net (L1 + least-squares adversarial loss, Adam 2e-4) on the "
        "training institutions of a manifest (equal patients per institution, 70/30 patient "
        "split), then store institution profiles, EDM statistics and the OOD calibration in "
        "OUT/model.safetensors. Also trains the baselines (--architecture) and MMgSN-Net "
        "ablations. Logs: OUT/training_log.csv and OUT/tensorboard. Distributed: torchrun "
        "--nproc-per-node N -m vcemri train ... (--batch-size is the global batch).",
    )
    trainer.add_argument("--manifest", required=True, metavar="CSV",
                         help="patient,institution,role,path (e.g. the simulator's)")
    trainer.add_argument("--out", required=True, metavar="DIR", help="run directory")
    trainer.add_argument("--institutions", type=_institution_list, default=None, metavar="LIST",
                         help="training institutions (default: all in the manifest); the "
                         "others are external")
    trainer.add_argument("--epochs", type=int, default=5)
    trainer.add_argument("--batch-size", type=int, default=4)
    trainer.add_argument("--width", type=float, default=0.25,
                         help="MMgSN-Net width multiplier (1 = the seed's; default 0.25)")
    trainer.add_argument("--architecture", default="mmgsn",
                         choices=("mmgsn", "unet", "hinet", "pix2pix", "cyclegan"),
                         help="generator: mmgsn (default) or a baseline of seed 000 (cyclegan "
                         "trains unpaired, with cycle-consistency, from one modality)")
    trainer.add_argument("--inputs", type=_modalities, default=("t1w", "t2w"), metavar="LIST",
                         help="input modalities of unet/pix2pix: t1w, t2w or t1w,t2w "
                         "(default both); cyclegan: t1w or t2w")
    trainer.add_argument("--fusion", choices=("sgs", "concat"), default="sgs",
                         help="MMgSN-Net ablation: concat replaces synergistic guidance (SGS)")
    trainer.add_argument("--no-multi-level", action="store_true",
                         help="MMgSN-Net ablation: fuse at the bottleneck only")
    trainer.add_argument("--no-attention", action="store_true",
                         help="MMgSN-Net ablation: no self-attention")
    trainer.add_argument("--l1-weight", type=float, default=100.0, help="default 100")
    trainer.add_argument("--adversarial-weight", type=float, default=1.0,
                         help="least-squares GAN loss weight (0 trains without the "
                         "discriminator's influence; default 1)")
    trainer.add_argument("--cycle-weight", type=float, default=10.0,
                         help="cyclegan: cycle-consistency weight (default 10; identity loss "
                         "half of it)")
    trainer.add_argument("--learning-rate", type=float, default=2e-4,
                         help="Adam learning rate (default 2e-4, seed 000)")
    trainer.add_argument("--init", metavar="CKPT", default=None,
                         help="start from a checkpoint's weights (fine-tuning)")
    trainer.add_argument("--decay-epochs", type=int, default=0, metavar="N",
                         help="decay the learning rate linearly over the last N epochs "
                         "(default 0: constant)")
    trainer.add_argument("--no-amp", action="store_true",
                         help="full precision on CUDA (default: bf16/fp16 mixed precision)")
    trainer.add_argument("--crop", type=_crop, default=None, metavar="ROWSxCOLS",
                         help="train on random crops of the 256x224 model grid, e.g. 128x112 "
                         "(~4x faster per step; default: whole slices)")
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    trainer.add_argument("--max-steps", type=int, default=None, metavar="N",
                         help="stop after N optimisation steps")
    trainer.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                         help="save the resumable state every N steps (default 50)")
    trainer.add_argument("--resume", action="store_true",
                         help="continue an interrupted run in --out exactly where it stopped")
    trainer.add_argument("--quiet", action="store_true", help="no progress bar")
    trainer.set_defaults(handler=_train)

    evaluator = commands.add_parser(
        "evaluate",
        help="evaluate a model on a manifest: MAE, MSE, SSIM, PSNR per institution",
        description="Run each patient through the synthesis pipeline and compare with the "
        "acquired CE-T1w (seed 000 and seed 001 conventions, whole image and tumour), next to "
        "'VCE = T1w', on the model's 256x224 grid as the seeds and on the acquired T1w grid; "
        "per institution, internal and external (the model's split.json, or the split "
        "recomputed from the seed and institutions its checkpoint records). "
        "Writes evaluation.csv/.md, significance.csv (paired Wilcoxon tests) and report.html "
        "with example figures and training curves.",
    )
    evaluator.add_argument("--model", required=True, metavar="[LABEL=]CKPT", action="append",
                           help="checkpoint to evaluate (builtin: the shipped model); "
                           "repeat to compare models (paired tests between them; the first "
                           "model's split is used)")
    evaluator.add_argument("--manifest", required=True, metavar="CSV")
    evaluator.add_argument("--out", required=True, metavar="DIR")
    evaluator.add_argument("--groups", default="internal,external",
                           help="split groups to evaluate (train, internal, external)")
    evaluator.add_argument("--device", default="auto")
    evaluator.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluator.set_defaults(handler=_evaluate)
