"""Series assembly and study readiness: from spooled instances to jobs.

A series is complete ``assembly.series_idle_s`` seconds after its last instance (or its
route's ``series_idle_s``: the route its own header matches), or as soon as it holds the
number of instances its header announces (ImagesInAcquisition; one instance for an enhanced
multi-frame series) or, when its header does not say, its route's ``expected_instances`` for
its role. A series that goes quiet with fewer instances than it
announces, or with a gap between its slice positions (a step more than 1.5 times the usual
spacing), is not whole: it waits for the rest up to ``assembly.incomplete_wait_s`` after its
last instance, and then its study's job fails with what is missing (a cut-off transfer is
never synthesized as if it were the whole series). A study is ready when the series its
route's model needs (read from the checkpoint's metadata: a T1w and a T2w, a STIR or
fat-suppressed T2w standing in, for MMgSN-Net; a T1w and, waited for a while, the optional
others for IMPORTANT-Net trained on subsets) are complete, of the same patient and frame of
reference (``series_rules``); its job then gets a route (``routes``: model and
destinations) and becomes ``ready``. A study still missing a sequence
``assembly.study_timeout_s`` after its first instance fails with the reason.

New content for a study that was already processed (a late series, changed instances) starts a
new job; the same content resent changes nothing, because the job's input key (series UIDs and
their content generations) is already known.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import config
import synthesis

from . import jobs as states
from .database import Connections
from .jobs import Job, JobQueue
from .spool import series_contents

log = logging.getLogger(__name__)

#: Short names of series roles in reasons (T1w, T2w, DWI, STIR, ...).
ROLE_NAMES = synthesis.INPUT_NAMES

#: How far back (seconds) studies are re-examined for content newer than their last job.
REVISIT_S = 86400.0
#: A step between neighbouring slice positions this many times the series' usual spacing
#: (the median step) is a gap: slices are missing there.
GAP_FACTOR = 1.5


def incompleteness(db: sqlite3.Connection, series: sqlite3.Row) -> str | None:
    """Why a series is not whole, or None: fewer instances than its header announces, or a
    gap between slice positions (single-frame series whose every instance has a position;
    at least three distinct positions are needed to know the usual spacing)."""
    expected, count = series["expected"], series["instances"]
    if expected is not None and count < expected:
        return f"{count} of the {expected} instances its header announces (ImagesInAcquisition)"
    positions = [r["position"] for r in db.execute(
        "SELECT position FROM instances WHERE series_uid = ?", (series["series_uid"],))]
    if len(positions) < 3 or any(p is None for p in positions):
        return None
    distinct = sorted({round(float(p), 3) for p in positions})
    steps = [b - a for a, b in zip(distinct, distinct[1:])]
    if len(steps) < 2:
        return None
    usual = sorted(steps)[len(steps) // 2]
    gaps = [(a, b) for a, b, step in zip(distinct, distinct[1:], steps)
            if usual > 0 and step > GAP_FACTOR * usual]
    if not gaps:
        return None
    a, b = gaps[0]
    missing = sum(round((b - a) / usual) - 1 for a, b in gaps)
    return (f"a gap between its slice positions: {b - a:.1f} mm from {a:.1f} to {b:.1f} mm "
            f"where its slices are {usual:.1f} mm apart (about {missing} slice(s) missing"
            + (f", {len(gaps)} gaps)" if len(gaps) > 1 else ")"))


def choose_route(settings: config.Settings, header: dict[str, Any]) -> config.Route | None:
    """The first route whose conditions the study's T1w header (plus calling AE) meets."""
    for route in settings.routes:
        if route.match.matches(header):
            return route
    return None


def input_key(inputs: dict[str, list[tuple[str, str]]], route: config.Route | None) -> str:
    """What a job's result depends on: the exact instances of its series (UIDs and content
    hashes) and the route; the same content resent gives the same key, any change another."""
    if set(inputs) == {"t1w", "t2w"}:  # as every T1w + T2w job has been keyed
        series: list[Any] = [inputs["t1w"], inputs["t2w"]]
    else:
        series = [[role, inputs[role]] for role in sorted(inputs)]
    text = json.dumps([*series, route and route.name, route and route.model])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _names(roles: list[str]) -> str:
    """'T1w', 'T1w and T2w', 'T1w, T2w and DWI'."""
    names = [ROLE_NAMES.get(r, r) for r in roles]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class Assembler:
    """Turns the spool's series table into jobs; call :meth:`tick` every second or so."""

    def __init__(self, settings: config.Settings, queue: JobQueue,
                 audit: config.AuditLog | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.audit = audit
        self.root = Path(settings.storage.root)
        self._connections = Connections(self.root)
        self._requirements: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def requirements(self, route: config.Route | None
                     ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) series roles for the route's model, read once from its
        checkpoint's metadata: T1w + T2w for MMgSN-Net; the T1w alone, the rest optional,
        for IMPORTANT-Net trained with modality dropout. A model that cannot be read is
        taken to need T1w + T2w; its job reports why it cannot run."""
        model = route.model if route is not None else "default"
        if model not in self._requirements:
            choice = self.settings.models.get(model)
            try:
                found = (synthesis.checkpoint_inputs(choice.checkpoint) if choice is not None
                         else (("t1w", "t2w"), ()))
            except config.VcemriError as exc:
                log.warning("model %s: %s; assuming it needs T1w + T2w", model, exc)
                found = (("t1w", "t2w"), ())
            self._requirements[model] = found
        return self._requirements[model]

    def _db(self) -> sqlite3.Connection:
        return self._connections.get()

    def tick(self, now: float | None = None) -> list[Job]:
        """Mark complete series, then create or advance the jobs of affected studies.
        Returns the jobs that changed."""
        now = time.time() if now is None else now
        db = self._db()
        idle = self.settings.assembly.series_idle_s
        wait = max(self.settings.assembly.incomplete_wait_s, idle)
        routes = self.settings.routes
        shortest = min([idle] + [r.series_idle_s for r in routes if r.series_idle_s is not None])
        counted = any(r.expected_instances for r in routes)
        candidates = db.execute(
            "SELECT * FROM series WHERE complete_generation IS NOT generation AND "
            "(last_received + ? <= ? OR (expected IS NOT NULL AND instances >= expected) OR ?)",
            (shortest, now, counted)).fetchall()
        completed, waiting = [], set()
        for row in candidates:
            if not self._quiet_or_whole(row, now):
                continue
            problem = incompleteness(db, row)
            if problem is not None and row["last_received"] + wait > now:
                if problem != row["problem"]:  # waits for the rest; its study says why
                    db.execute("UPDATE series SET problem = ? WHERE series_uid = ?",
                               (problem, row["series_uid"]))
                    log.warning("series %s incomplete: %s; waiting up to %.0f s for the rest",
                                row["series_uid"], problem, wait)
                    waiting.add(row["study_uid"])
                continue
            db.execute("UPDATE series SET complete_generation = ?, problem = ? WHERE "
                       "series_uid = ?", (row["generation"], problem, row["series_uid"]))
            completed.append(row)
            if problem is None:
                log.info("series %s complete: %d instances", row["series_uid"],
                         row["instances"])
            else:
                log.warning("series %s still incomplete after %.0f s: %s", row["series_uid"],
                            wait, problem)
            if self.audit is not None:
                self.audit.record("series.complete" if problem is None else
                                  "series.incomplete", series_uid=row["series_uid"],
                                  study_uid=row["study_uid"], count=row["instances"],
                                  **({"reason": problem} if problem else {}))
        studies = {r["study_uid"] for r in completed} | waiting
        studies |= {j.study_uid for j in self.queue.list(states=(states.WAITING,))}
        # studies never seen, and studies with content newer than their newest job's inputs
        # (it arrived while a job was in flight, or before a crash between marking a series
        # complete and creating its job); a day back at most
        revisit = db.execute(
            "SELECT s.study_uid FROM series s GROUP BY s.study_uid HAVING "
            "max(s.last_received) > ? AND max(s.last_received) > coalesce("
            "(SELECT max(j.keyed_at) FROM jobs j WHERE j.study_uid = s.study_uid), 0) "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid AND j.state "
            "IN ('ready', 'running', 'sending'))", (now - REVISIT_S,)).fetchall()
        studies |= {r["study_uid"] for r in revisit}
        changed = []
        for study in sorted(studies):
            job = self._study(study, now)
            if job is not None:
                changed.append(job)
        return changed

    def _quiet_or_whole(self, row: sqlite3.Row, now: float) -> bool:
        """Whether a series is complete by time or count: its idle time (its route's, where
        the route its own header matches sets one) has passed since its last instance, or it
        holds the instances its header announces or its route expects for its role."""
        route = choose_route(self.settings, json.loads(row["header"]))
        idle = self.settings.assembly.series_idle_s
        if route is not None and route.series_idle_s is not None:
            idle = route.series_idle_s
        expected = row["expected"]
        if expected is None and route is not None:
            # its role's own count, else (a STIR or fat-suppressed T2w) the T2w's it stands in for
            counts = route.expected_instances
            expected = counts.get(row["role"], next(
                (counts[role] for role, stands in synthesis.STANDS_IN.items()
                 if row["role"] in stands and role in counts), None))
        return (row["last_received"] + idle <= now
                or (expected is not None and row["instances"] >= expected))

    def _study(self, study: str, now: float) -> Job | None:
        db = self._db()
        series = db.execute("SELECT * FROM series WHERE study_uid = ? ORDER BY last_received",
                            (study,)).fetchall()
        jobs = self.queue.list(study_uid=study)
        active = next((j for j in jobs if j.state in states.ACTIVE), None)
        chosen, missing, route = self._inputs(series, now)
        if chosen is not None:
            t1w = chosen["t1w"]
            header = json.loads(t1w["header"])
            inputs = {role: series_contents(db, row["series_uid"])
                      for role, row in chosen.items()}
            key = input_key(inputs, route)
            if active is not None and active.state != states.WAITING:
                return None  # in flight; new content gets its own job when this one ends
            if any(j.input_key == key for j in jobs):
                return None  # this content was handled already (a resend)
            values = {"input_key": key, "t1w_series_uid": t1w["series_uid"],
                      "t2w_series_uid": chosen["t2w"]["series_uid"] if "t2w" in chosen
                      else None, "keyed_at": now, "inputs": inputs}
            broken = [f"the {ROLE_NAMES.get(s['role'], s['role'])} series {s['series_uid']} "
                      f"has {s['problem']}" for s in chosen.values() if s["problem"]]
            if broken:
                wait = max(self.settings.assembly.incomplete_wait_s,
                           self.settings.assembly.series_idle_s)
                reason = (f"{'; '.join(broken)}, {wait:.0f} s after its last instance: the "
                          "transfer was cut off or the scanner sent part of the series; send "
                          "the whole series again (vcemri jobs retry --force processes what "
                          "arrived)")
                log.warning("study %s: %s", study, reason)
                if active is None:
                    return self.queue.enqueue(study, state=states.FAILED, reason=reason,
                                              **values)
                return self.queue.complete(active.id, states.FAILED, reason, **values)
            if route is None:
                reason = ("no route matches the study (calling AE "
                          f"{header.get('CallingAETitle') or '-'}, modality "
                          f"{header.get('Modality') or '-'}, body part "
                          f"{header.get('BodyPartExamined') or '-'}); it is kept, not "
                          "processed")
                log.warning("study %s: %s", study, reason)
                if active is None:
                    return self.queue.enqueue(study, state=states.REJECTED, reason=reason,
                                              **values)
                return self.queue.complete(active.id, states.REJECTED, reason, **values)
            values.update(route=route.name, model=route.model,
                          destinations=list(route.destinations))
            reason = f"{_names(list(chosen))} complete; route {route.name}"
            if active is None:
                job = self.queue.enqueue(study, state=states.READY, reason=reason, **values)
            else:
                job = self.queue.complete(active.id, states.READY, reason, **values)
            log.info("job %d ready: study %s, route %s, model %s, to %s", job.id, study,
                     route.name, route.model, ", ".join(route.destinations) or "nowhere")
            return job
        if not series:
            return None
        if any(j.state in states.TERMINAL for j in jobs) and active is None:
            return None  # processed before; waits for new content quietly
        if active is None:
            return self.queue.enqueue(study, state=states.WAITING, reason=missing)
        if active.state != states.WAITING:
            return None
        receiving = any(s["complete_generation"] != s["generation"] for s in series)
        first = min(s["first_received"] for s in series)
        timeout = self.settings.assembly.study_timeout_s
        if not receiving and now - first >= timeout:
            return self.queue.fail(active.id, f"{missing} within {timeout:.0f} s")
        if active.reason != missing:
            return self.queue.complete(active.id, states.WAITING, missing)
        return None

    def _inputs(self, series: list[sqlite3.Row], now: float
                ) -> tuple[dict[str, sqlite3.Row] | None, str, config.Route | None]:
        """The series a job would read ({role: row}: the newest complete T1w and, of the same
        patient and frame of reference, each input its route's model needs, a T2w standing in
        by ``synthesis.STANDS_IN``), or None and why not; and the route.

        Optional inputs (a model that accepts subsets) are waited for: while one is being
        received, and otherwise one more idle time (the route's ``series_idle_s``) after the
        required series went quiet (twice the idle time after the study's last instance);
        never beyond ``study_timeout_s`` after its first."""
        complete = [s for s in series if s["complete_generation"] == s["generation"]]
        t1ws = [s for s in complete if s["role"] == "t1w"]
        anchor = t1ws[-1] if t1ws else (series[-1] if series else None)
        route = None if anchor is None else choose_route(self.settings,
                                                          json.loads(anchor["header"]))
        required, optional = self.requirements(route)

        def newest(role: str, t1w: sqlite3.Row, rows: list[sqlite3.Row]) -> sqlite3.Row | None:
            for stand_in in synthesis.STANDS_IN.get(role, (role,)):
                for row in reversed(rows):
                    if (row["role"] == stand_in and row["patient_id"] == t1w["patient_id"]
                            and row["frame_of_reference_uid"] == t1w["frame_of_reference_uid"]):
                        return row
            return None

        for t1w in reversed(t1ws):
            chosen = {"t1w": t1w}
            for role in required[1:]:
                found = newest(role, t1w, complete)
                if found is None:
                    break
                chosen[role] = found
            else:
                absent = []
                for role in optional:
                    found = newest(role, t1w, complete)
                    if found is not None:
                        chosen[role] = found
                    else:
                        absent.append(role)
                if not absent:
                    return chosen, "", route
                idle = self.settings.assembly.series_idle_s
                if route is not None and route.series_idle_s is not None:
                    idle = route.series_idle_s
                receiving = [r for r in absent if newest(r, t1w, series) is not None]
                last = max(s["last_received"] for s in series)
                first = min(s["first_received"] for s in series)
                bounded = now - first >= self.settings.assembly.study_timeout_s
                # a series is complete one idle time after its last instance: the optional
                # ones get one more
                if bounded or (not receiving and now >= last + 2 * idle):
                    return {r: chosen[r] for r in ("t1w", *required[1:], *optional)
                            if r in chosen}, "", route
                return None, (f"{_names(list(chosen))} complete; waiting up to {idle:.0f} s "
                              f"for the optional {_names(absent)} series"), route
        names = {r: ROLE_NAMES.get(r, r) for r in required}
        by_role = {r: [s for s in complete if s["role"] in synthesis.STANDS_IN.get(r, (r,))]
                   for r in required}
        if all(by_role.values()):
            return None, (f"no {_names(list(required))} series of the same patient and frame "
                          "of reference received"), route
        stands = {r: synthesis.STANDS_IN.get(r, (r,)) for r in required}
        absent = [names[r] for r in required if not by_role[r]]
        pending = [names[r] for r in required
                   if any(s["role"] in stands[r] for s in series) and not by_role[r]]
        partial = [f"{ROLE_NAMES.get(s['role'], s['role'])} series incomplete "
                   f"({s['problem']}); waiting for the rest" for s in series
                   if any(s["role"] in stands[r] for r in required) and s["problem"]
                   and s["complete_generation"] != s["generation"]]
        if partial:
            return None, "; ".join(partial), route
        if pending:
            return None, f"{' and '.join(pending)} series not complete", route
        return None, f"{' and '.join(absent)} series not received", route
