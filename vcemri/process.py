"""``vcemri process``: the node's pipeline on a folder, without the network.

Finds the series the model reads (configured series rules: the T1w and T2w, or for a model
trained on other inputs, e.g. IMPORTANT-Net, those it has), runs ``synthesis``, and writes what the
TPS would receive (``planning``): the synthetic series, the RTSTRUCT helpers, the review image
(PNG and Secondary Capture), plus the VCE and confidence as NIfTI and ``result.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import config


def _process(args: argparse.Namespace) -> int:
    import planning
    import synthesis

    settings = config.load_settings(args.config)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise config.VcemriError(f"output directory {out} is not empty",
                                 hint="choose another or pass --overwrite")
    source = Path(args.input)
    if not source.is_dir():
        raise config.InputError(f"input folder {source} does not exist")
    service = planning.SynthesisService(settings)
    synthesizer, _ = service.synthesizer(checkpoint=args.model, device=args.device,
                                         align=args.register)
    # the series the model reads: a T1w always (the output's grid and units), the rest as
    # the model needs them or, for a model that accepts subsets, as the folder has them
    found = synthesis.find_inputs(source, settings.series_rules,
                                  tuple(dict.fromkeys(("t1w", *synthesizer.inputs))),
                                  synthesizer.required_inputs)
    done = service.process(
        found.pop("t1w"), found.pop("t2w", None), out, checkpoint=args.model,
        device=args.device, align=args.register, nifti=True, extra_files=found)
    decision = done.summary["institution"]
    where = (f"known institution {decision['institution']}" if decision["known"] else
             f"external (closest training institution {decision['closest']})")
    written = done.outputs
    print(f"synthetic series: {len(written.series)} instances in "
          f"{written.series[0].path.parent}")
    print(f"RTSTRUCT: {written.rtstruct.path if written.rtstruct else 'none'}" + (
        f" ({'; '.join(written.notes)})" if written.notes else ""))
    print(f"review: {written.review_png} and {written.review.path}")
    print("inputs: " + ", ".join(f"{synthesis.INPUT_NAMES.get(role, role)} {uid}"
                                 for role, uid in done.summary["inputs"].items()))
    print(f"institution: {where}, confidence {decision['confidence']:.2f}; "
          f"{done.summary['edm']['line']}")
    print(f"time: {done.summary['timings_s']['total']:.1f} s on {done.device}", file=sys.stderr)
    return 0


def add_commands(commands: Any) -> None:
    """Add ``process`` to the ``vcemri`` sub-command parser."""
    parser = commands.add_parser(
        "process",
        help="synthesize a VCE-T1w for the T1w and T2w series in a folder and write the "
        "DICOM objects for the TPS",
        description="Find the T1w and T2w series (or the inputs the model reads: T1w, T2w, DWI, "
        "...) in INPUT_DIR (configured series rules), run "
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
