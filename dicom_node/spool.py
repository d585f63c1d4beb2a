"""The spool: every received instance on disk, durable before it is acknowledged.

An instance is written exactly as received (file meta + the dataset bytes the peer sent, never
decoded and re-encoded) to a temporary file beside its final name, fsynced, renamed atomically
and the directory fsynced; only then is it indexed in SQLite (WAL) and only then does the SCP
answer success. A crash at any point leaves either nothing visible or a complete file:
temporary files are removed at start-up, and a complete file without an index row (a crash
between rename and commit, or a commit a power cut rolled back) is indexed again at start-up
(:meth:`Spool.reconcile`).

UIDs come from the network and are checked before they name a path. A resent SOP Instance UID
with the same bytes changes nothing. With other bytes it is a new version: it is written beside
the first (``<series>/versions/<instance>.<sha256 prefix>.dcm``) and becomes the instance's
current content, which the next job of its series uses; every earlier version keeps its file
and an ``instance_versions`` row, so that a job created with it still processes exactly its
inputs. Nothing a job used is ever overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config

from .database import Connections, transaction
from .pixel_check import pixel_data_problem

log = logging.getLogger(__name__)

#: DIMSE C-STORE failure statuses (PS3.4 Table B.2-1).
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

@dataclass(frozen=True)
class Received:
    """The spool's answer to one C-STORE: a DIMSE status and, for failures, the reason."""

    status: int
    reason: str | None = None
    sop_instance_uid: str | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    new: bool = False
    #: optional header values that were not numbers and are ignored (keywords)
    ignored: tuple[str, ...] = ()
    #: the SHA-256 of the version this one replaced as the instance's current content (a
    #: resent SOP Instance UID with other bytes); None otherwise
    replaced: str | None = None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def series_contents(db: sqlite3.Connection, series_uid: str) -> list[tuple[str, str]]:
    """(SOP Instance UID, SHA-256) of every spooled instance of a series, by UID: what a job's
    inputs are, fixed when it becomes ready."""
    rows = db.execute("SELECT sop_instance_uid, sha256 FROM instances WHERE series_uid = ? "
                      "ORDER BY sop_instance_uid", (series_uid,)).fetchall()
    return [(r["sop_instance_uid"], r["sha256"]) for r in rows]


def slice_position(dataset: Any) -> float | None:
    """Where a single-frame image lies along the normal of its plane (mm): the dot product of
    ImagePositionPatient with the cross product of ImageOrientationPatient's row and column
    directions; None when either is missing or unreadable."""
    try:
        position = [float(v) for v in dataset.ImagePositionPatient]
        row_x, row_y, row_z, col_x, col_y, col_z = (float(v)
                                                    for v in dataset.ImageOrientationPatient)
    except (AttributeError, TypeError, ValueError):
        return None
    if len(position) != 3:
        return None
    normal = (row_y * col_z - row_z * col_y, row_z * col_x - row_x * col_z,
              row_x * col_y - row_y * col_x)
    value = sum(p * n for p, n in zip(position, normal, strict=True))
    return value if math.isfinite(value) else None


def _describe(dataset: Any, calling_ae: str, rules: Any) -> dict[str, Any]:
    """What the index keeps of an instance: its series' header and role, read by the same
    code as ``vcemri process`` (``synthesis.series_info``, ``synthesis.series_role``), and the
    instances the series announces. Raises ValueError for an unreadable structural value
    (NumberOfFrames); an unreadable optional value is left out of the header, and named in
    ``ignored``."""
    import synthesis

    info = synthesis.series_info(dataset)
    header = {**info.header(), "CallingAETitle": calling_ae}
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    # an enhanced multi-frame series is usually one instance
    expected = 1 if frames > 1 else info.images_in_acquisition
    json.dumps(header, allow_nan=False)
    return {"header": header, "expected": expected, "role": synthesis.series_role(rules, header),
            "position": None if frames > 1 else slice_position(dataset),
            "patient_id": str(dataset.get("PatientID", "") or ""),
            "frame_of_reference_uid": info.frame_of_reference_uid,
            "ignored": synthesis.unreadable_values(dataset)}


class Spool:
    """Receives instances into ``<root>/spool/<study>/<series>/<instance>.dcm`` and indexes them.

    Thread-safe: the SCP calls :meth:`store` from one thread per association.
    """

    def __init__(self, settings: config.Settings, *, recover: bool = True) -> None:
        """``recover``: the node's start-up clean-up (temporary files of instances never
        acknowledged removed, unindexed files indexed); off for a tool that opens the spool
        beside a running node (``vcemri jobs purge``)."""
        self.settings = settings
        self.root = Path(settings.storage.root)
        self.directory = self.root / "spool"
        self.directory.mkdir(parents=True, exist_ok=True)
        # NORMAL: the fsynced spool file, not the index row, is the durable record
        self._connections = Connections(self.root, synchronous="NORMAL")
        self._index_lock = threading.Lock()
        if recover:
            self._remove_temporary_files()
            self.reconcile()

    def _db(self) -> sqlite3.Connection:
        return self._connections.get()

    def reconcile(self) -> int:
        """Index every complete spool file the index lacks; returns how many."""
        with self._index_lock:
            known = {r["sop_instance_uid"]
                     for r in self._db().execute("SELECT sop_instance_uid FROM instances")}
        added = 0
        for path in sorted(self.directory.glob("*/*/*.dcm")):
            if path.stem in known:  # file names are the validated SOP Instance UIDs
                continue
            added += self._index_file(path, path.read_bytes())
        added += self._reconcile_versions()
        if added:
            log.warning("re-indexed %d spool file(s) whose index rows were lost", added)
        return added

    def _index_file(self, path: Path, encoded: bytes) -> bool:
        """Index a spooled file as its instance's current content (start-up recovery); a file
        that cannot be indexed is renamed ``.unreadable`` and False returned."""
        import pydicom

        try:
            dataset = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True)
            uids = {k: str(dataset.get(k, "")) for k in (
                "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")}
            self._index(_describe(dataset, "-", self.settings.series_rules), uids,
                        str(dataset.file_meta.TransferSyntaxUID), path,
                        hashlib.sha256(encoded).hexdigest(), len(encoded), "-")
        except Exception:  # noqa: BLE001 - a file that cannot be indexed is set aside
            path.rename(path.with_suffix(".unreadable"))
            log.error("spool file %s cannot be indexed; renamed to .unreadable", path.name)
            return False
        return True

    def _reconcile_versions(self) -> int:
        """Index every acknowledged later version (``versions/``) whose row was lost: as the
        current content when it is newer than the indexed one, else as an earlier version."""
        with self._index_lock:
            db = self._db()
            known = {r["path"] for r in db.execute("SELECT path FROM instances")} | {
                r["path"] for r in db.execute("SELECT path FROM instance_versions")}
        added = 0
        for path in sorted(self.directory.glob("*/*/versions/*.dcm")):
            if str(path) in known:
                continue
            sop = path.name.rsplit(".", 2)[0]
            encoded = path.read_bytes()
            digest = hashlib.sha256(encoded).hexdigest()
            with self._index_lock:
                current = self._db().execute(
                    "SELECT received_at FROM instances WHERE sop_instance_uid = ?",
                    (sop,)).fetchone()
            written = path.stat().st_mtime
            if current is None or written > current["received_at"]:
                if not self._index_file(path, encoded):
                    continue
            else:
                with self._index_lock:
                    db = self._db()
                    with transaction(db):
                        db.execute("INSERT OR IGNORE INTO instance_versions (sop_instance_uid, "
                                   "sha256, path, bytes, received_at, replaced_at) "
                                   "VALUES (?, ?, ?, ?, ?, ?)",
                                   (sop, digest, str(path), len(encoded), written,
                                    current["received_at"]))
            added += 1
        return added

    def _remove_temporary_files(self) -> None:
        for leftover in self.directory.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def free_mib(self) -> float:
        """Free space on the spool's file system, MiB."""
        return shutil.disk_usage(self.directory).free / 2**20

    def store(self, encoded: bytes, calling_ae: str, announced: str | None = None) -> Received:
        """Make one received instance (file meta + dataset bytes) durable and index it.
        ``announced``: the C-STORE request's Affected SOP Instance UID, which must be the
        data set's."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            # in full: the pixel bytes are in memory already, and pixel_check measures them
            dataset = pydicom.dcmread(io.BytesIO(encoded))
            transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, EOFError, ValueError, KeyError, AttributeError,
                OSError, TypeError, OverflowError) as exc:
            return Received(CANNOT_UNDERSTAND, f"the data set cannot be decoded: {exc}")
        uids = {}
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
            value = str(dataset.get(keyword, "") or "").rstrip("\0 ")
            if not config.is_uid(value) or not value:
                return Received(CANNOT_UNDERSTAND,
                                f"{keyword} is missing or not a valid UID",
                                sop_instance_uid=uids.get("SOPInstanceUID"))
            uids[keyword] = value
        sop, series, study = (uids["SOPInstanceUID"], uids["SeriesInstanceUID"],
                              uids["StudyInstanceUID"])
        ids = {"sop_instance_uid": sop, "series_uid": series, "study_uid": study}
        if announced and announced != sop:
            return Received(DATA_SET_MISMATCH, "the request's Affected SOP Instance UID is not "
                            "the data set's SOP Instance UID", **ids)
        try:
            described = _describe(dataset, calling_ae, self.settings.series_rules)
        except (ValueError, TypeError, OverflowError) as exc:
            return Received(CANNOT_UNDERSTAND, f"a header value cannot be read: {exc}", **ids)
        ignored = tuple(described["ignored"])
        try:
            incomplete = pixel_data_problem(dataset, encoded)
        except Exception as exc:  # pydicom's reader on damaged data: any error is a refusal
            incomplete = f"the pixel data cannot be read: {exc}"
        if incomplete:
            return Received(CANNOT_UNDERSTAND, incomplete, **ids)
        free = self.free_mib()
        if free < self.settings.storage.min_free_mib:
            return Received(OUT_OF_RESOURCES,
                            f"only {free:.0f} MiB free under {self.directory} (storage."
                            f"min_free_mib is {self.settings.storage.min_free_mib})", **ids)
        digest = hashlib.sha256(encoded).hexdigest()
        folder = self.directory / study / series
        path = folder / f"{sop}.dcm"
        with self._index_lock:
            known = self._db().execute(
                "SELECT sha256, series_uid, study_uid, path FROM instances "
                "WHERE sop_instance_uid = ?", (sop,)).fetchone()
            owner = self._db().execute("SELECT study_uid FROM series WHERE series_uid = ?",
                                       (series,)).fetchone()
        if known is not None and (known["series_uid"], known["study_uid"]) != (series, study):
            return Received(DATA_SET_MISMATCH,
                            f"SOP Instance UID {sop} was received before in series "
                            f"{known['series_uid']}; a UID cannot move between series", **ids)
        if owner is not None and owner["study_uid"] != study:
            return Received(DATA_SET_MISMATCH,
                            f"series {series} was received before in study {owner['study_uid']}",
                            **ids)
        if known is not None and known["sha256"] == digest:
            if Path(known["path"]).is_file():
                self._touch(series)  # a resend is activity: the series is still being received
                return Received(0x0000, ignored=ignored, **ids)
            path = Path(known["path"])  # its file was lost: written again where it was
            folder = path.parent
        elif known is not None:  # other bytes under a known UID: a new version, beside the old
            with self._index_lock:
                earlier = self._db().execute(
                    "SELECT path FROM instance_versions WHERE sop_instance_uid = ? AND "
                    "sha256 = ?", (sop, digest)).fetchone()
            folder = folder / "versions"
            path = Path(earlier["path"]) if earlier else folder / f"{sop}.{digest[:16]}.dcm"
            folder = path.parent
        temporary = folder / f".{sop}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _fsync_directory(folder)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            return Received(OUT_OF_RESOURCES, f"cannot write to the spool: {what}", **ids)
        try:
            self._index(described, uids, transfer_syntax, path, digest, len(encoded), calling_ae)
        except sqlite3.Error as exc:
            # the file is complete but unindexed: the peer sees a failure and resends it
            return Received(OUT_OF_RESOURCES, f"cannot index the instance: {exc}", **ids)
        replaced = known["sha256"] if known is not None and known["sha256"] != digest else None
        return Received(0x0000, new=True, ignored=ignored, replaced=replaced, **ids)

    def _index(self, described: dict[str, Any], uids: dict[str, str], transfer_syntax: str,
               path: Path, digest: str, size: int, calling_ae: str) -> None:
        now = time.time()
        header, expected = described["header"], described["expected"]
        with self._index_lock:
            db = self._db()
            with transaction(db):
                previous = db.execute(
                    "SELECT series_uid, sha256, path, bytes, received_at FROM instances "
                    "WHERE sop_instance_uid = ?", (uids["SOPInstanceUID"],)).fetchone()
                if previous is not None and previous["sha256"] != digest:
                    # the version it replaces stays, for the jobs created with it
                    db.execute("INSERT OR REPLACE INTO instance_versions (sop_instance_uid, "
                               "sha256, path, bytes, received_at, replaced_at) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (uids["SOPInstanceUID"], previous["sha256"], previous["path"],
                                previous["bytes"], previous["received_at"], now))
                    db.execute("DELETE FROM instance_versions WHERE sop_instance_uid = ? AND "
                               "sha256 = ?", (uids["SOPInstanceUID"], digest))
                db.execute(
                    "INSERT OR REPLACE INTO instances (sop_instance_uid, series_uid, study_uid, "
                    "sop_class_uid, transfer_syntax_uid, path, sha256, bytes, received_at, "
                    "calling_ae, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (uids["SOPInstanceUID"], uids["SeriesInstanceUID"],
                     uids["StudyInstanceUID"], uids["SOPClassUID"], transfer_syntax,
                     str(path), digest, size, now, calling_ae, described["position"]))
                row = db.execute("SELECT instances FROM series WHERE series_uid = ?",
                                 (uids["SeriesInstanceUID"],)).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO series (series_uid, study_uid, patient_id, "
                        "frame_of_reference_uid, role, header, expected, instances, generation, "
                        "first_received, last_received, complete_generation) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, 1, 1, ?, ?, NULL)",
                        (uids["SeriesInstanceUID"], uids["StudyInstanceUID"],
                         described["patient_id"], described["frame_of_reference_uid"],
                         described["role"], json.dumps(header),
                         expected, now, now))
                else:
                    grew = 0 if previous is not None else 1
                    db.execute(
                        "UPDATE series SET instances = instances + ?, "
                        "generation = generation + 1, last_received = ? WHERE series_uid = ?",
                        (grew, now, uids["SeriesInstanceUID"]))

    def restart_idle_clocks(self) -> int:
        """At start-up: series still being received get a full idle period from now (the
        node was down, so their senders' silence proves nothing). Returns how many."""
        with self._index_lock:
            db = self._db()
            with transaction(db):
                return db.execute("UPDATE series SET last_received = max(last_received, ?) "
                                  "WHERE complete_generation IS NOT generation",
                                  (time.time(),)).rowcount

    def _touch(self, series_uid: str) -> None:
        """Mark a series as just received (no new content: its generation stays)."""
        with self._index_lock:
            db = self._db()
            with transaction(db):
                db.execute("UPDATE series SET last_received = ? WHERE series_uid = ?",
                           (time.time(), series_uid))

    def files_of(self, contents: list[tuple[str, str]]) -> list[Path]:
        """The spooled files of exactly these instances, as they were when listed (the
        version with that SHA-256, also after the UID was resent with other bytes); raises
        :class:`config.InputError` when one is gone, so that a job never processes other data
        than its inputs say."""
        wanted = set(contents)
        uids = [uid for uid, _ in contents]
        found = {row["sop_instance_uid"]: Path(row["path"])
                 for table in ("instances", "instance_versions")
                 for row in self._by_uid(table, "sop_instance_uid, sha256, path", uids)
                 if (row["sop_instance_uid"], row["sha256"]) in wanted}
        missing = [uid for uid, _ in contents if uid not in found or not found[uid].is_file()]
        if missing:
            raise config.InputError(
                f"{len(missing)} of the job's {len(contents)} input instances are no longer "
                f"in the spool as they were when the job was created (e.g. {missing[0]}): "
                "purged, or removed by hand; send the series again")
        return sorted(found.values())

    def measure(self, uids: list[str]) -> tuple[int, int]:
        """(instances, bytes) of these spooled instances, earlier versions' bytes included."""
        rows = self._rows(uids)
        return len(rows), sum(int(r["bytes"]) for r in rows + self._versions(uids))

    def _by_uid(self, table: str, columns: str, uids: list[str]) -> list[sqlite3.Row]:
        """``columns`` of ``table``'s rows for these SOP Instance UIDs, queried in chunks
        (SQLite caps the number of parameters)."""
        rows: list[sqlite3.Row] = []
        with self._index_lock:
            for start in range(0, len(uids), 500):
                chunk = uids[start:start + 500]
                rows += self._db().execute(
                    f"SELECT {columns} FROM {table} WHERE sop_instance_uid IN "
                    f"({', '.join('?' for _ in chunk)})", chunk).fetchall()
        return rows

    def _versions(self, uids: list[str]) -> list[sqlite3.Row]:
        return self._by_uid("instance_versions", "sop_instance_uid, path, bytes", uids)

    def _rows(self, uids: list[str]) -> list[sqlite3.Row]:
        return self._by_uid("instances", "sop_instance_uid, series_uid, path, bytes", uids)

    def remove(self, uids: list[str]) -> tuple[int, int]:
        """Delete these instances (retention): files first, then their index rows (a file
        left without its row would be re-indexed at start); a series left empty loses its
        row too, so that the same series sent again is new. Returns (instances, bytes)."""
        rows, versions = self._rows(uids), self._versions(uids)
        for row in rows + versions:
            Path(row["path"]).unlink(missing_ok=True)
        series = sorted({row["series_uid"] for row in rows})
        with self._index_lock:
            db = self._db()
            with transaction(db):
                db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?",
                               [(row["sop_instance_uid"],) for row in rows])
                db.executemany("DELETE FROM instance_versions WHERE sop_instance_uid = ?",
                               [(row["sop_instance_uid"],) for row in rows])
                for series_uid in series:
                    left = db.execute("SELECT count(*) FROM instances WHERE series_uid = ?",
                                      (series_uid,)).fetchone()[0]
                    if left:
                        db.execute("UPDATE series SET instances = ? WHERE series_uid = ?",
                                   (left, series_uid))
                    else:
                        db.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
        for row in rows:
            folder = Path(row["path"]).parent
            if folder.name == "versions":
                folder = folder.parent
            for empty in (folder / "versions", folder, folder.parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()  # only when empty
        return len(rows), sum(int(r["bytes"]) for r in rows + versions)

    def series_files(self, series_uid: str) -> list[Path]:
        """The spooled files of a series."""
        with self._index_lock:
            rows = self._db().execute("SELECT path FROM instances WHERE series_uid = ?",
                                      (series_uid,)).fetchall()
        return sorted(Path(r["path"]) for r in rows)
