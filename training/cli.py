"""The training package's commands: ``vcemri train`` and ``vcemri evaluate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import synthesis

from .augmentation import PROBABILITY

#: What ``vcemri train`` and ``vcemri evaluate`` need beyond the node (the training extra).
TRAINING_EXTRA = ("matplotlib", "tensorboard", "monai", "skimage")


def require_training_extra() -> None:
    """Refuse with the fix when the training extra is not installed."""
    from importlib.util import find_spec

    missing = [name for name in TRAINING_EXTRA if find_spec(name) is None]
    if missing:
        from config import InputError

        raise InputError(f"training and evaluation need {', '.join(missing)}, which are not "
                         "installed", hint="pip install 'vcemri[training]'")


def _institution_list(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise argparse.ArgumentTypeError("name at least one institution")
    return keys


def _modalities(text: str) -> tuple[str, ...]:
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    if not values or any(v not in ("t1w", "t2w", "dwi", "adc") for v in values) or len(
            set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give t1w, t2w or t1w,t2w (IMPORTANT-Net "
                                         "also dwi and adc, e.g. t1w,t2w,dwi)")
    return values


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability between 0 and 1")
    return value


def _quantile(text: str) -> float | None:
    if text == "mean":
        return None
    value = _probability(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a quantile strictly between 0 and 1")
    return value


def _spacing(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pixel spacing in mm") from None
    if not 0.3 <= value <= 3.0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an in-plane pixel spacing between 0.3 and 3 mm (head-and-neck MR "
            "is acquired at 0.5-1.2 mm)")
    return value


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


def _train_painter(args: argparse.Namespace) -> int:
    """``vcemri train --architecture cgsamr``: seed 002's CG-SAMR as a lesion painter."""
    from tqdm import tqdm

    from .cgsamr import PainterOptions, train_painter

    ignored = [flag for flag, given in (("--resume", args.resume), ("--init", args.init),
                                        ("--paint", args.paint), ("--crop", args.crop),
                                        ("--augment", args.augment),
                                        ("--spacing-mm", args.spacing_mm)) if given]
    if ignored:
        from config import InputError

        raise InputError(f"{', '.join(ignored)} do(es) not apply to --architecture cgsamr (it "
                         "trains on 96-pixel windows around lesions for --max-steps steps)")
    steps = args.max_steps or 1000
    options = PainterOptions(institutions=args.institutions, steps=steps,
                             batch_size=args.batch_size, width=args.width, seed=args.seed,
                             learning_rate=args.learning_rate,
                             normalization=args.normalization, split=args.split)
    with tqdm(total=steps, unit="step", desc="CG-SAMR", file=sys.stderr,
              disable=args.quiet) as bar:

        def progress(step: int, values: dict[str, float]) -> None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k in ("l1", "sc")})
            bar.update(1)

        path = train_painter(Path(args.manifest), Path(args.out), options, progress,
                             command=args.command_line)
    print(f"painter: {path} ({steps} steps); use it with vcemri train --paint {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    require_training_extra()
    if args.architecture in synthesis.PAINTERS:
        return _train_painter(args)
    from tqdm import tqdm

    from .trainer import TrainOptions, train

    options = TrainOptions(
        institutions=args.institutions, epochs=args.epochs, batch_size=args.batch_size,
        width=args.width, seed=args.seed, device=args.device, max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every, crop=args.crop, architecture=args.architecture,
        inputs=args.inputs, modality_dropout=args.modality_dropout, fusion=args.fusion,
        multi_level=not args.no_multi_level,
        attention=not args.no_attention, confidence=not args.no_confidence,
        amp=not args.no_amp, l1_weight=args.l1_weight,
        adversarial_weight=args.adversarial_weight, cycle_weight=args.cycle_weight,
        decay_epochs=args.decay_epochs,
        learning_rate=args.learning_rate, init=args.init, micro_batches=args.micro_batches,
        fitness_steps=args.fitness_steps, augment=args.augment,
        normalization=args.normalization, split=args.split, spacing_mm=args.spacing_mm,
        paint=None if args.paint is None else str(args.paint),
        paint_probability=args.paint_probability)
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
                       resume=args.resume, command=args.command_line)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 reports
    print(f"model: {result.checkpoint} ({result.steps} steps, {result.seconds:.0f} s)")
    print(f"split: {len(result.split['train'])} training, {len(result.split['internal'])} "
          f"internal, {len(result.split['external'])} external patients "
          f"({Path(args.out) / 'split.json'})")
    print(f"internal L1 (normalized units): model {result.metrics['internal_l1_normalized']:.4f}, "
          f"'VCE = T1w' {result.metrics['internal_l1_t1w_copy_normalized']:.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    require_training_extra()
    from tqdm import tqdm

    from .evaluate import evaluate, left_out_markdown, write

    with tqdm(unit="patient", desc="evaluating", file=sys.stderr, disable=args.quiet) as bar:

        def advance(patient: str | None, total: int) -> None:
            bar.total = total
            if patient is None:
                bar.refresh()
                return
            bar.set_postfix_str(patient)
            bar.update(1)

        models = dict(_model_argument(m) for m in args.model)
        if len(models) == 1 and not any("=" in m for m in args.model):
            models = {"model": next(iter(models.values()))}
        evaluation = evaluate(models, Path(args.manifest), tuple(args.groups.split(",")),
                              args.device, progress=advance, edm=not args.no_edm,
                              confidence=not args.no_confidence,
                              keep_t1w_detail=args.keep_t1w_detail,
                              second_opinion=args.second_opinion)
    if not evaluation.rows:
        from config import InputError

        raise InputError(f"no patients of the groups {args.groups} in {args.manifest}")
    written = write(evaluation, Path(args.out))
    print(evaluation.markdown, end="")
    print(left_out_markdown(evaluation.left_out), end="")
    if evaluation.no_split:
        print(evaluation.no_split)
    print(f"written: {written['csv']}, {written['markdown']}, {written['significance']} and "
          f"{written['html']} (with {len(written) - 4} figures)")
    return 0


def _refit(args: argparse.Namespace) -> int:
    require_training_extra()
    from tqdm import tqdm

    from .confidence import RefitOptions, refit_confidence

    if args.steps < 1:
        from config import InputError

        raise InputError(f"--steps {args.steps}: at least one step")
    options = RefitOptions(steps=args.steps, augment=args.augment, seed=args.seed,
                           device=args.device, quantile=args.quantile,
                           patients=args.patients)
    with tqdm(total=args.steps, unit="step", desc="refitting the confidence map",
              file=sys.stderr, disable=args.quiet) as bar:

        def progress(step: int, loss: float) -> None:
            bar.set_postfix_str(f"loss {loss:.3f}")
            bar.update(1)

        result = refit_confidence(args.model, Path(args.manifest), Path(args.out), options,
                                  progress, command=args.command_line)
    which = "training" if args.patients == "training" else "unseen-site"
    print(f"model: {result.checkpoint} ({result.steps} steps on {result.patients} {which} "
          f"patients, {result.seconds:.0f} s; error head loss {result.loss_first:.3f} -> "
          f"{result.loss_last:.3f})")
    if result.no_split:
        print(f"note: {result.no_split}", file=sys.stderr)
    return 0


def _recalibrate(args: argparse.Namespace) -> int:
    require_training_extra()
    from .recalibration import recalibrate

    result = recalibrate(args.model, Path(args.manifest), Path(args.out), args.crop,
                         args.device, command=args.command_line,
                         fitness_steps=args.fitness_steps)
    print(f"model: {result.checkpoint} (BatchNorm statistics of {result.batches} crop batches "
          f"of {result.patients} training patients, {result.seconds:.0f} s); internal L1 "
          f"inside the head, normalised units: {result.l1_before:.4f} -> {result.l1_after:.4f} "
          f"('VCE = T1w' {result.l1_t1w_copy:.4f})")
    if result.fitness is not None:
        print(f"fitness classifier: {args.fitness_steps} steps, threshold "
              f"{result.fitness.threshold:.2f} (study logit)")
    return 0


def _model_argument(text: str) -> tuple[str, Path]:
    from synthesis import INPUT_NAMES

    from .evaluate import model_spec

    label, _, path = text.rpartition("=")
    checkpoint, subset = model_spec(path)
    default = checkpoint.parent.name or checkpoint.stem
    if subset:
        default += " {" + ", ".join(INPUT_NAMES.get(r, r) for r in subset) + "}"
    return (label or default), Path(path)


def add_commands(commands: Any) -> None:
    """Add ``train`` and ``evaluate`` to the ``vcemri`` sub-command parser."""
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
                         choices=(*synthesis.GENERATORS, *synthesis.PAINTERS),
                         help="generator: mmgsn (default), a baseline of seed 000 (cyclegan "
                         "trains unpaired, with cycle-consistency, from one modality) or seed "
                         "003's important (IMPORTANT-Net); cgsamr trains seed 002's CG-SAMR "
                         "as a lesion painter for --paint (--max-steps steps, default 1000, "
                         "of --batch-size windows; OUT/painter.safetensors)")
    trainer.add_argument("--inputs", type=_modalities, default=("t1w", "t2w"), metavar="LIST",
                         help="input modalities of unet/pix2pix/important: t1w, t2w or t1w,t2w "
                         "(default both); important also dwi, adc (the manifest's dwi/adc "
                         "series, e.g. t1w,t2w,dwi); cyclegan: t1w or t2w")
    trainer.add_argument("--modality-dropout", type=float, default=0.0, metavar="P",
                         help="IMPORTANT-Net: hide a random non-empty proper subset of the "
                         "inputs in a share P of the steps, so that the checkpoint accepts any "
                         "subset of them (seed 003; default 0: every input needed)")
    trainer.add_argument("--fusion", choices=("sgs", "concat"), default="sgs",
                         help="MMgSN-Net ablation: concat replaces synergistic guidance (SGS)")
    trainer.add_argument("--no-multi-level", action="store_true",
                         help="MMgSN-Net ablation: fuse at the bottleneck only")
    trainer.add_argument("--no-attention", action="store_true",
                         help="MMgSN-Net ablation: no self-attention")
    trainer.add_argument("--no-confidence", action="store_true",
                         help="MMgSN-Net without seed 002's confidence module (the seed's "
                         "plain network; the node then estimates confidence from a mirrored "
                         "pass only)")
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
    trainer.add_argument("--fitness-steps", type=int, default=1500, metavar="N",
                         help="steps of the fitness classifier's training after the generator "
                         "(seed 000's screening network; default 1500, 0: none)")
    trainer.add_argument("--micro-batches", type=int, default=1, metavar="N",
                         help="split each batch into N parts with their own BatchNorm "
                         "statistics (what N DistributedDataParallel processes would compute; "
                         "default 1)")
    trainer.add_argument("--augment", type=_probability, nargs="?", const=PROBABILITY,
                         default=0.0, metavar="P",
                         help="augment the training slices on the fly (geometry, contrast, "
                         "resolution, artefacts; each transform with probability P, default "
                         f"{PROBABILITY} when given without P); default: off")
    trainer.add_argument("--paint", metavar="PAINTER", default=None,
                         help="repaint the training patients' lesions on the fly, edited "
                         "(moved, grown, shrunk, necrotic), with a CG-SAMR painter (vcemri train "
                         "--architecture cgsamr's OUT/painter.safetensors); default: off")
    trainer.add_argument("--paint-probability", type=_probability, default=0.5, metavar="P",
                         help="probability that a lesion slice is repainted (default 0.5)")
    trainer.add_argument("--normalization", default="zscore-patient",
                         choices=synthesis.NORMALIZATIONS, metavar="METHOD-LEVEL",
                         help="intensity normalization (seed 001): zscore or minmax, at "
                         "patient, image (slice) or dataset level, e.g. minmax-dataset; "
                         "default zscore-patient. Only dataset level lets EDM act (the "
                         "others are scale-invariant)")
    trainer.add_argument("--split", metavar="SPLIT_JSON", default=None,
                         help="take the patients from this split.json (another run's or a "
                         "study's) instead of drawing them: its training and internal patients "
                         "of the training institutions; every other institution external")
    trainer.add_argument("--no-amp", action="store_true",
                         help="full precision on CUDA (default: bf16/fp16 mixed precision)")
    trainer.add_argument("--crop", type=_crop, default=None, metavar="ROWSxCOLS",
                         help="train on random crops of the model grid, e.g. 128x112 "
                         "(~4x faster per step; default: whole slices)")
    trainer.add_argument("--spacing-mm", type=_spacing, default=None, metavar="MM",
                         help="run the network at this pixel spacing (square pixels, mm; "
                         "e.g. 0.8) on a canvas holding the widest field of view, instead of "
                         "stretching every slice to the seeds' 256x224 matrix; the node then "
                         "synthesizes at that spacing too")
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    trainer.add_argument("--max-steps", type=int, default=None, metavar="N",
                         help="stop after N optimization steps")
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
    evaluator.add_argument("--model", required=True, metavar="[LABEL=]CKPT[@INPUTS]",
                           action="append",
                           help="checkpoint to evaluate (builtin: the shipped model); "
                           "repeat to compare models (paired tests between them; the first "
                           "model's split is used); @t1w, @t2w+dwi, ... gives a model that "
                           "accepts subsets (IMPORTANT-Net, --modality-dropout) only those "
                           "inputs")
    evaluator.add_argument("--manifest", required=True, metavar="CSV")
    evaluator.add_argument("--out", required=True, metavar="DIR")
    evaluator.add_argument("--groups", default="internal,external",
                           help="split groups to evaluate (train, internal, external)")
    evaluator.add_argument("--device", default="auto")
    evaluator.add_argument("--no-confidence", action="store_true",
                           help="no mirrored pass and confidence map: the VCE is the plain "
                           "pass (half the time; the confidence columns stay empty)")
    evaluator.add_argument("--keep-t1w-detail", action="store_true",
                           help="add the T1w detail the round trip through the model grid "
                           "removes back to the VCE (models.<name>.keep_t1w_detail)")
    evaluator.add_argument("--second-opinion", metavar="CKPT", default=None,
                           help="join this model's confidence map ('builtin', 'builtin:NAME' or "
                           "a checkpoint) to each model's, the lower of the two per pixel "
                           "(models.<name>.second_opinion)")
    evaluator.add_argument("--no-edm", action="store_true",
                           help="no external distribution matching (it only acts on models "
                           "trained with dataset-level normalization)")
    evaluator.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluator.set_defaults(handler=_evaluate)

    refit = commands.add_parser(
        "refit-confidence",
        help="refit a model's confidence map on augmented training slices",
        description="Teach a trained model's confidence module (seed 002) what its errors look "
        "like on inputs unlike its training sites: its error head is refitted on the "
        "checkpoint's own training patients of the manifest, augmented to look like other "
        "scanners and protocols (contrast curves, gamma, bias field, resolution, artefacts, "
        "noise), or (--patients unseen) on a set-aside cohort of sites it was not trained "
        "on. The VCE, the screening and the fitness classifier stay exactly those of the "
        "input model. Writes OUT/model.safetensors and OUT/refit.json.",
    )
    refit.add_argument("--model", required=True, metavar="CKPT",
                       help="checkpoint with a confidence module (builtin: the shipped model)")
    refit.add_argument("--manifest", required=True, metavar="CSV",
                       help="the cohort the model was trained on (with --patients unseen: "
                       "a cohort of other sites, set aside for this)")
    refit.add_argument("--patients", choices=("training", "unseen"), default="training",
                       help="training: the model's training patients of the manifest, "
                       "augmented (default); unseen: every patient of the manifest at a site "
                       "the model was not trained on, so the head learns the generator's real "
                       "errors at new sites (never evaluate on those patients afterwards)")
    refit.add_argument("--out", required=True, metavar="DIR")
    refit.add_argument("--steps", type=int, default=1500, metavar="N",
                       help="optimization steps of the error head (default 1500)")
    refit.add_argument("--augment", type=_probability, default=0.5, metavar="P",
                       help="probability of each augmentation transform (default 0.5)")
    refit.add_argument("--quantile", type=_quantile, default=0.7, metavar="Q",
                       help="teach the head the error the VCE exceeds with probability 1 - Q, "
                       "so that a confidence of 0.5 means a 1 - Q chance of an error above "
                       "half the T1w's head SD (default 0.7); 'mean': its expected error")
    refit.add_argument("--seed", type=int, default=0)
    refit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    refit.add_argument("--quiet", action="store_true", help="no progress bar")
    refit.set_defaults(handler=_refit)

    recal = commands.add_parser(
        "recalibrate", help="recompute a crop-trained model's BatchNorm statistics on crops "
        "of its training patients (models trained before they were taken on whole slices)",
        description="Recompute the BatchNorm statistics of a model trained on crops over the "
        "same crops of its training patients (recomputed from the seed and institutions it "
        "records), then its OOD calibration and internal L1. Refit its error head afterwards "
        "(vcemri refit-confidence).")
    recal.add_argument("--model", required=True, metavar="CKPT",
                       help="a checkpoint, or 'builtin' ('builtin:NAME') for a shipped model")
    recal.add_argument("--manifest", required=True, metavar="CSV",
                       help="the cohort the model was trained on")
    recal.add_argument("--out", required=True, metavar="DIR")
    recal.add_argument("--crop", type=_crop, default=None, metavar="ROWSxCOLS",
                       help="the crop size (default: the one the model was trained with)")
    recal.add_argument("--fitness-steps", type=int, default=0, metavar="N",
                       help="also train seed 000's fitness classifier for N steps, as vcemri "
                       "train does (for a model trained with --fitness-steps 0, or to "
                       "replace its own; default 0: keep what the model has)")
    recal.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    recal.set_defaults(handler=_recalibrate)

