"""Parameter counts of every model in the registry, at the seeds' width and at the small CPU
width the shipped model uses.

    python benchmarks/models.py

Prints one line per model and width (the README's models table).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthesis.models import MODELS, build, parameter_count

#: Extra keyword arguments per model (registry name -> label -> kwargs).
VARIANTS = {
    "mmgsn": {"": {}, "with the confidence module": {"confidence": True}},
    "important": {"T1w + T2w": {"inputs": ("t1w", "t2w")},
                  "T1w + T2w + DWI": {"inputs": ("t1w", "t2w", "dwi")}},
}


def main() -> int:
    print(f"{'model':<10} {'variant':<28} {'width 1':>12} {'width 0.25':>12} {'0.125':>10}")
    for name in MODELS:
        for label, extra in VARIANTS.get(name, {"": {}}).items():
            counts = [parameter_count(build(name, width_multiplier=w, **extra))
                      for w in (1.0, 0.25, 0.125)]
            print(f"{name:<10} {label:<28} {counts[0]:>12,} {counts[1]:>12,} {counts[2]:>10,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
