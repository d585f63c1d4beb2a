"""Wall time of the README's "Train a model, then process a study" commands, run as a user
runs them (``vcemri`` in a fresh folder), one after the other.

    python benchmarks/commands.py

Prints the machine, each command with its seconds, and the total.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe

#: Exactly the README's commands (section "Train a model, then process a study").
COMMANDS = (
    "vcemri simulate --out cohort --institutions inst1,inst2,inst3,inst4 "
    "--patients-per-institution 4 --matrix-scale 0.5 --slices 12",
    "vcemri train --manifest cohort/manifest.csv --out run --institutions inst1,inst2,inst3 "
    "--epochs 3",
    "vcemri evaluate --model run/model.safetensors --manifest cohort/manifest.csv --out eval",
    "vcemri process cohort/inst4/inst4-001 --out out --model run/model.safetensors",
)


def main() -> int:
    print(describe(("torch", "numpy", "pydicom", "SimpleITK")))
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="vcemri-commands-") as tmp:
        for command in COMMANDS:
            argv = shlex.split(command)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "vcemri", *argv[1:], "--quiet"]
                                  if argv[1] in ("simulate", "train", "evaluate")
                                  else [sys.executable, "-m", "vcemri", *argv[1:]],
                                  cwd=tmp, capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - started
            if done.returncode:
                print(done.stdout[-2000:] + done.stderr[-2000:])
                raise SystemExit(f"failed: {command}")
            total += seconds
            print(f"{seconds:8.1f} s  {command}")
    print(f"{total:8.1f} s  in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
