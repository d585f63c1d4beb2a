"""``vcemri process``: synthesise a VCE-T1w for a study in a folder, as the node would."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import config


def _describe(rule: config.SeriesRule) -> str:
    parts = []
    if rule.description:
        parts.append("SeriesDescription matching " + " or ".join(repr(p) for p in rule.description))
    if rule.exclude_description:
        parts.append("not matching " + ", ".join(repr(p) for p in rule.exclude_description))
    for label, bounds in (("TR", rule.repetition_time_ms), ("TE", rule.echo_time_ms),
                          ("TI", rule.inversion_time_ms)):
        if bounds is not None:
            parts.append(f"{label} in [{bounds.min}, {bounds.max}] ms")
    if rule.contrast_agent != "any":
        parts.append(f"contrast agent {rule.contrast_agent}")
    return "; ".join(parts)


def find_pair(folder: Path, rules: Any) -> tuple[list[Path], list[Path]]:
    """The files of the T1w and the T2w series in ``folder`` by the configured rules."""
    import pydicom

    from .series import scan_folder, series_info

    found: dict[str, list[tuple[str, list[Path]]]] = {"t1w": [], "t2w": []}
    for uid, files in scan_folder(folder).items():
        info = series_info(pydicom.dcmread(files[0], stop_before_pixels=True))
        if info.modality != "MR":
            continue
        for role in found:
            if getattr(rules, role).matches(info.header()):
                found[role].append((uid, files))
    names = {"t1w": "T1-weighted", "t2w": "T2-weighted"}
    for role, candidates in found.items():
        if not candidates:
            raise config.InputError(
                f"no {names[role]} series found (looked for: {_describe(getattr(rules, role))})",
                hint=f"check the series descriptions or series_rules.{role} in the configuration")
        if len(candidates) > 1:
            uids = ", ".join(uid for uid, _ in candidates)
            raise config.InputError(
                f"{len(candidates)} {names[role]} series match ({uids}); keep one in the folder "
                f"or tighten series_rules.{role}")
    return found["t1w"][0][1], found["t2w"][0][1]


def _process(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .pipeline import PipelineOptions, RejectedStudy, Synthesizer
    from .series import read_series

    settings = config.load_settings(args.config)
    choice = settings.models["default"]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise config.VcemriError(f"output directory {out} is not empty",
                                 hint="choose another or pass --overwrite")
    source = Path(args.input)
    if not source.is_dir():
        raise config.InputError(f"input folder {source} does not exist")
    t1_files, t2_files = find_pair(source, settings.series_rules)
    options = PipelineOptions(device=args.device or choice.device,
                              batch_size=choice.batch_size, align=args.register)
    synthesizer = Synthesizer(args.model or choice.checkpoint, options)
    t1w, t2w = read_series(t1_files), read_series(t2_files)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = synthesizer.run(t1w, t2w)
    except RejectedStudy as rejected:
        (out / "result.json").write_text(json.dumps(
            {"t1w_series_uid": t1w.info.series_uid, "t2w_series_uid": t2w.info.series_uid,
             "screening": rejected.screening.as_dict(), "model": synthesizer.model_info},
            indent=1))
        raise
    sitk.WriteImage(result.vce.image, str(out / "vce.nii.gz"), useCompression=True)
    if result.confidence is not None:
        sitk.WriteImage(result.confidence, str(out / "confidence.nii.gz"), useCompression=True)
    (out / "result.json").write_text(json.dumps(result.summary(), indent=1))
    decision = result.institution
    where = (f"known institution {decision.institution}" if decision.known else
             f"external (closest training institution {decision.closest})")
    print(f"VCE-T1w written to {out / 'vce.nii.gz'} ({result.vce.shape[0]} slices, T1w geometry)")
    print(f"institution: {where}, confidence {decision.confidence:.2f}; EDM factors "
          f"T1w {result.edm.t1w:.3f}, T2w {result.edm.t2w:.3f}")
    print(f"screening: accepted (OOD score {result.screening.ood_score})"
          if result.screening.ood_score is not None else "screening: accepted")
    print(f"time: {result.timings['total']:.1f} s on {synthesizer.predictor.device}",
          file=sys.stderr)
    return 0


def add_commands(commands: Any) -> None:
    """Add ``process`` to the ``vcemri`` sub-command parser."""
    parser = commands.add_parser(
        "process",
        help="synthesise a VCE-T1w for the T1w and T2w series in a folder",
        description="Find the T1w and T2w series in INPUT (by the configured series rules), "
        "run the synthesis pipeline, and write the VCE-T1w and its confidence map (NIfTI, in "
        "the T1w's geometry) with result.json (institution, EDM, screening, timings).",
    )
    parser.add_argument("input", metavar="INPUT_DIR", help="folder with the study's DICOM files")
    parser.add_argument("--out", required=True, metavar="OUTPUT_DIR", help="output folder")
    parser.add_argument("--model", metavar="CKPT",
                        help="checkpoint (default: models.default.checkpoint of the config)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: from the config)")
    parser.add_argument("--register", choices=("never", "auto", "always"), default="never",
                        help="rigid T2w-to-T1w registration (default never: one session "
                        "shares a frame of reference)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder")
    parser.set_defaults(handler=_process)
