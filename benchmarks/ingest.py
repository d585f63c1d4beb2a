"""Ingest speed: a 300-instance MR series (256 x 256, 16-bit) sent by dcmtk storescu
(TCP_NODELAY=1) into the vcemri node (``vcemri serve``: every instance fsynced and indexed
before its response), into dcmtk storescp and into pynetdicom alone (a bare storage SCP in
this process with the spool's durability and nothing else: write, fsync, rename, fsync the
directory; no checks, no index), in the same rounds; medians and the ratios to storescp; then
where the node's time per instance goes: the spool alone (``Spool.store``, in process: decode
the header, write, fsync, rename, fsync the directory, index) and, of it, a bare write + fsync
of the same bytes.

pynetdicom alone is the floor of any receiver built on pynetdicom that syncs each instance
before answering: its reactor threads poll their queues with 1 ms sleeps (issue #650 of
pydicom/pynetdicom), which no handler can win back.

    python benchmarks/ingest.py [--instances 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from support.dcmtk import StoreSCP, storescu
from support.processes import ManagedProcess, free_port, port_open

from benchmarks.machine import describe


def make_series(folder: Path, count: int) -> list[Path]:
    """``count`` MR instances of one series, 256 x 256 x 16 bit (128 KiB of pixels each)."""
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    series, study = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    files = []
    for i in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = "T1 AX BENCHMARK"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 256
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = rng.integers(0, 4096, (256, 256), dtype=np.uint16).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def spool_breakdown(files: list[Path], work: Path) -> tuple[float, float]:
    """Median ms per instance of ``Spool.store`` and of a bare write + fsync of the same
    bytes, in this process (no network)."""
    import os

    import config
    import dicom_node

    # preamble, file meta and data set, as the SCP hands them over (encoded_dataset())
    encoded = [path.read_bytes() for path in files]
    settings = config.Settings(storage={"root": work / "spool-only", "min_free_mib": 0})
    spool = dicom_node.Spool(settings)
    per_store = []
    for data in encoded:
        started = time.perf_counter()
        received = spool.store(data, "BENCH")
        per_store.append(time.perf_counter() - started)
        if received.status != 0:
            raise SystemExit(f"the spool refused an instance: {received.reason}")
    per_fsync = []
    bare = work / "fsync-only"
    bare.mkdir()
    for k, data in enumerate(encoded):
        started = time.perf_counter()
        with open(bare / f"{k}.dcm", "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        per_fsync.append(time.perf_counter() - started)
    return 1000 * statistics.median(per_store), 1000 * statistics.median(per_fsync)


class BareReceiver:
    """pynetdicom's storage SCP with the spool's durability and nothing else: each data set
    written as received, fsynced, renamed into place and its directory fsynced before the
    Success response; 1 MiB PDUs like the node."""

    def __init__(self, folder: Path) -> None:
        import os

        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from dicom_node.spool import _fsync_directory

        self.folder = folder
        folder.mkdir(parents=True)
        self.count = 0

        def store(event: object) -> int:
            encoded = event.encoded_dataset()  # type: ignore[attr-defined]
            self.count += 1
            temporary, final = folder / f".{self.count}.tmp", folder / f"{self.count}.dcm"
            with open(temporary, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
            _fsync_directory(folder)  # the spool's own
            return 0x0000

        ae = AE("BARE")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_pdu_size = 1_048_576
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, store)])

    def close(self) -> None:
        self.server.shutdown()


def timed_send(files: list[Path], port: int, called_ae: str) -> float:
    started = time.perf_counter()
    result = storescu(files, port, called_ae=called_ae, timeout=600)
    seconds = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"storescu failed:\n{result.output[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(describe(("pydicom", "pynetdicom")))
    with tempfile.TemporaryDirectory(prefix="vcemri-ingest-") as tmp:
        work = Path(tmp)
        files = make_series(work / "series", args.instances)
        size_mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"series: {args.instances} instances, {size_mib:.1f} MiB, storescu with "
              "TCP_NODELAY=1, one association")
        node_times, dcmtk_times, bare_times = [], [], []
        for round_ in range(args.rounds):
            root = work / f"node-{round_}"
            port = free_port()
            config_file = work / f"node-{round_}.yaml"
            config_file.write_text(
                f"dicom: {{port: {port}}}\nstorage: {{root: {root}, min_free_mib: 0}}\n"
                "assembly: {series_idle_s: 3600}\n")
            node = ManagedProcess([sys.executable, "-m", "vcemri", "--config", str(config_file),
                                   "--log-level", "WARNING", "serve"], work / f"node-{round_}.log")
            node.wait_until(lambda port=port: port_open(port), 60, "vcemri serve")
            try:
                node_times.append(timed_send(files, port, "VCEMRI"))
            finally:
                node.stop(grace=30)
            with sqlite3.connect(root / "node.sqlite") as db:
                stored = db.execute("SELECT count(*) FROM instances").fetchone()[0]
            with StoreSCP(work / f"storescp-{round_}") as scp:
                dcmtk_times.append(timed_send(files, scp.port, "TPS"))
                received = len(scp.received())
            bare = BareReceiver(work / f"bare-{round_}")
            try:
                bare_times.append(timed_send(files, bare.port, "BARE"))
            finally:
                bare.close()
            print(f"round {round_ + 1}: node {node_times[-1]:.2f} s ({stored} indexed), "
                  f"storescp {dcmtk_times[-1]:.2f} s ({received} files), pynetdicom alone "
                  f"{bare_times[-1]:.2f} s ({bare.count} files)")
        node_s, dcmtk_s = statistics.median(node_times), statistics.median(dcmtk_times)
        bare_s = statistics.median(bare_times)
        print(f"median wall time: node {node_s:.2f} s ({args.instances / node_s:.0f} "
              f"instances/s, fsync per instance), storescp {dcmtk_s:.2f} s "
              f"({args.instances / dcmtk_s:.0f} instances/s, no fsync), pynetdicom alone "
              f"{bare_s:.2f} s ({args.instances / bare_s:.0f} instances/s, fsync per instance)")
        print(f"ratio node / storescp: {node_s / dcmtk_s:.2f} (issue 19's goal: at most 6); "
              f"pynetdicom alone / storescp: {bare_s / dcmtk_s:.2f}; node / pynetdicom alone: "
              f"{node_s / bare_s:.2f}")
        store_ms, fsync_ms = spool_breakdown(files, work)
        print(f"per instance: node {1000 * node_s / args.instances:.2f} ms, of which the spool "
              f"{store_ms:.2f} ms (in process, median; a bare write + fsync of the same bytes "
              f"{fsync_ms:.2f} ms); storescp {1000 * dcmtk_s / args.instances:.2f} ms; "
              f"pynetdicom alone {1000 * bare_s / args.instances:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
