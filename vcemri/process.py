"""``vcemri process``: the node's pipeline on a folder, without the network.

Finds the T1w and T2w series (configured series rules), runs ``synthesis``, and writes what the
TPS would receive (``planning``): the synthetic series, the RTSTRUCT helpers, the review image
(PNG and Secondary Capture), plus the VCE and confidence as NIfTI and ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import config


def _process(args: argparse.Namespace) -> int:
    import pydicom
    import SimpleITK as sitk

    import planning
    import synthesis

    settings = config.load_settings(args.config)
    choice = settings.models["default"]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise config.VcemriError(f"output directory {out} is not empty",
                                 hint="choose another or pass --overwrite")
    source = Path(args.input)
    if not source.is_dir():
        raise config.InputError(f"input folder {source} does not exist")
    t1_files, t2_files = synthesis.find_pair(source, settings.series_rules)
    options = synthesis.PipelineOptions(device=args.device or choice.device,
                                        batch_size=choice.batch_size, align=args.register)
    synthesizer = synthesis.Synthesizer(args.model or choice.checkpoint, options)
    t1w, t2w = synthesis.read_series(t1_files), synthesis.read_series(t2_files)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = synthesizer.run(t1w, t2w)
    except synthesis.RejectedStudy as rejected:
        (out / "result.json").write_text(json.dumps(
            {"t1w_series_uid": t1w.info.series_uid, "t2w_series_uid": t2w.info.series_uid,
             "screening": rejected.screening.as_dict(), "model": synthesizer.model_info},
            indent=1))
        raise
    header = pydicom.dcmread(t1_files[0], stop_before_pixels=True)
    written = planning.write_outputs(result, header, out, settings.planning)
    sitk.WriteImage(result.vce.image, str(out / "vce.nii.gz"), useCompression=True)
    if result.confidence is not None:
        sitk.WriteImage(result.confidence, str(out / "confidence.nii.gz"), useCompression=True)
    summary = result.summary()
    summary["outputs"] = {
        "synthetic_series": str(written.series[0].parent),
        "rtstruct": None if written.rtstruct is None else str(written.rtstruct),
        "review_dicom": str(written.review_dicom), "review_png": str(written.review_png),
        "notes": written.notes,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    decision = result.institution
    where = (f"known institution {decision.institution}" if decision.known else
             f"external (closest training institution {decision.closest})")
    print(f"synthetic series: {len(written.series)} instances in {written.series[0].parent}")
    print(f"RTSTRUCT: {written.rtstruct or 'none'}" + (
        f" ({'; '.join(written.notes)})" if written.notes else ""))
    print(f"review: {written.review_png} and {written.review_dicom}")
    print(f"institution: {where}, confidence {decision.confidence:.2f}; EDM factors "
          f"T1w {result.edm.t1w:.3f}, T2w {result.edm.t2w:.3f}")
    print(f"time: {result.timings['total']:.1f} s on {synthesizer.predictor.device}",
          file=sys.stderr)
    return 0


def add_commands(commands: Any) -> None:
    """Add ``process`` to the ``vcemri`` sub-command parser."""
    parser = commands.add_parser(
        "process",
        help="synthesise a VCE-T1w for the T1w and T2w series in a folder and write the "
        "DICOM objects for the TPS",
        description="Find the T1w and T2w series in INPUT_DIR (configured series rules), run "
        "the synthesis pipeline and write the synthetic series, RTSTRUCT helpers and review "
        "image (DICOM and PNG), the VCE and confidence as NIfTI, and result.json.",
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
