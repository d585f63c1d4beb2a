"""End to end: time from the last instance received by the node to the last synthetic object
stored at the TPS (dcmtk storescp), for a simulated 30-slice study sent by dcmtk storescu;
with the breakdown (series idle time, synthesis, sending). Medians over rounds.

    python benchmarks/end_to_end.py [--rounds 3] [--slices 30] [--idle 10] [--model builtin]
                                    [--expected]

``--expected``: the route expects the study's slice counts (``routes[].expected_instances``),
so each series is complete at its last instance instead of after the idle time.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.dcmtk import StoreSCP, storescu
from support.node import NodeProcess, finished_jobs, wait_for, write_config

from benchmarks.machine import describe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--idle", type=float, default=10.0, help="assembly.series_idle_s")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--expected", action="store_true",
                        help="the route expects --slices instances per series")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    import simulation

    print(describe(("pydicom", "pynetdicom", "torch")))
    latencies, syntheses = [], []
    with tempfile.TemporaryDirectory(prefix="vcemri-e2e-") as tmp:
        work = Path(tmp)
        options = simulation.SimulationOptions(institutions=("inst1",),
                                               patients_per_institution=1, slices=args.slices,
                                               seed=11)
        record = simulation.simulate_patient(work / "patient", "inst1", 1, options)
        files = [f for role in ("t1w", "t2w")
                 for f in sorted((work / "patient" / record.paths[role]).glob("*.dcm"))]
        print(f"study: T1w + T2w, {args.slices} slices each, "
              f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB; series idle time "
              f"{args.idle:.0f} s" + (f" (the route expects {args.slices} instances per "
                                      "series)" if args.expected else "")
              + f"; model {args.model}")
        for round_ in range(args.rounds):
            with StoreSCP(work / f"tps-{round_}") as tps:
                root = work / f"node-{round_}"
                config_file = write_config(
                    work / f"node-{round_}.yaml", root, Path(args.model),
                    destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                          "port": tps.port}},
                    assembly={"series_idle_s": args.idle, "study_timeout_s": 600},
                    models={"default": {"checkpoint": args.model, "device": args.device,
                                        "batch_size": 8}},
                    routes=[{"name": "default", "destinations": ["tps"],
                             "expected_instances": ({"t1w": args.slices, "t2w": args.slices}
                                                    if args.expected else {})}])
                node = NodeProcess(config_file, work / f"node-{round_}.log")
                try:
                    sent = storescu(files, node.port, called_ae="VCEMRI")
                    assert sent.ok, sent.output
                    job = wait_for(lambda root=root: finished_jobs(root), 900, "the job")[0]
                    assert job["state"] == "done", job["reason"]
                    with sqlite3.connect(root / "node.sqlite") as db:
                        last_in = db.execute("SELECT max(received_at) FROM instances").fetchone()[0]
                        outputs = db.execute("SELECT count(*) FROM outputs").fetchone()[0]
                    wait_for(lambda tps=tps, n=outputs: len(tps.received()) >= n, 60, "the TPS")
                    last_out = max(p.stat().st_mtime for p in tps.received())
                finally:
                    node.stop()
                result = json.loads(job["result"])
            latency = last_out - last_in
            latencies.append(latency)
            syntheses.append(result.get("processing_s", float("nan")))
            print(f"round {round_ + 1}: {latency:.1f} s from the last instance received to the "
                  f"last object at the TPS ({outputs} objects; processing "
                  f"{syntheses[-1]:.1f} s on {result.get('device')})")
    median = statistics.median(latencies)
    idle = "no" if args.expected else f"{args.idle:.0f} s"
    print(f"median: {median:.1f} s end to end, of which {idle} series idle time and "
          f"{statistics.median(syntheses):.1f} s processing (synthesis + writing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
