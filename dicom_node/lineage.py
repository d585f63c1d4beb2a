"""Which earlier result a job's result replaces.

A series that gains an instance, or an instance resent with other bytes, after the study's
results were delivered gets a job of its own, and its outputs get new UIDs (their identity is
the exact input content and the model: ``planning.identity``). The TPS then holds two synthetic
series of the same T1w; the new one says which it supersedes (its SeriesDescription, its
DerivationDescription and ImageComments, the RTSTRUCT's descriptions, result.json) and what
changed in the input since.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import planning
import synthesis

from .jobs import Job, JobQueue

log = logging.getLogger(__name__)

#: Short names of the input roles (T1w, T2w, DWI, ...).
ROLES = synthesis.INPUT_NAMES


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def input_change(before: dict[str, list[tuple[str, str]]],
                 after: dict[str, list[tuple[str, str]]]) -> str:
    """What changed between two jobs' inputs (role -> [(SOP Instance UID, SHA-256)]), in
    words: ``the T1w gained 2 instances; the T2w: 1 instance resent with other content``."""
    parts = []
    for role in dict.fromkeys([*before, *after]):
        name = ROLES.get(role, role)
        if role not in before or role not in after:  # a model's optional input
            parts.append(f"the {name} series was {'added' if role in after else 'left out'}")
            continue
        old, new = dict(before.get(role, [])), dict(after.get(role, []))
        gained = len(new.keys() - old.keys())
        lost = len(old.keys() - new.keys())
        changed = sum(1 for uid in new.keys() & old.keys() if new[uid] != old[uid])
        words = [w for w in (gained and f"gained {_plural(gained, 'instance')}",
                             lost and f"lost {_plural(lost, 'instance')}",
                             changed and f"{_plural(changed, 'instance')} resent with other "
                                         "content") if w]
        if words:
            parts.append(f"the {name} {', '.join(words)}")
    return "; ".join(parts) or "the input was processed again"


def _series_uid(queue: JobQueue, job: Job) -> str | None:
    """The synthetic series an earlier job wrote: its result says so (jobs since this
    release), else the first synthetic output file, while it is still there."""
    uid = ((job.result.get("outputs") or {}).get("synthetic_series_uid"))
    if uid:
        return str(uid)
    import pydicom

    for output in queue.outputs(job.id):
        if Path(output.path).parent.name == "synthetic" and Path(output.path).is_file():
            try:
                return str(pydicom.dcmread(output.path, stop_before_pixels=True)
                           .SeriesInstanceUID)
            except Exception:  # noqa: BLE001 - an unreadable old output names nothing
                return None
    return None


def superseded(queue: JobQueue, job: Job) -> planning.Supersedes | None:
    """The most recent earlier job of the same T1w and T2w series whose synthetic series
    reached a destination, as what ``job``'s result supersedes; None when there is none."""
    for earlier in queue.list(study_uid=job.study_uid):  # newest first
        if (earlier.id >= job.id or earlier.t1w_series_uid != job.t1w_series_uid
                or earlier.t2w_series_uid != job.t2w_series_uid):
            continue
        if not any(queue.delivered(earlier.id, name) for name in earlier.destinations):
            continue
        uid = _series_uid(queue, earlier)
        if uid is None:
            continue
        at = earlier.result.get("delivered_at") or earlier.updated_at
        when = _dt.datetime.fromtimestamp(float(at)).strftime("%Y-%m-%d %H:%M")
        return planning.Supersedes(uid, when, input_change(earlier.inputs, job.inputs))
    return None
