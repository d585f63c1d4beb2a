"""C-STORE SCU: results to a destination (TPS, PACS), one association per job.

Each instance is tried twice within the association; an instance the peer keeps refusing, a
refused association or a peer that cannot be reached raise :class:`config.PeerError` with the
reason, and the job retries later (``dicom_node.worker``). Instances already delivered are
skipped, so a retried job never sends one twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import config

from .jobs import Output
from .tls import client_context

log = logging.getLogger(__name__)

ATTEMPTS_PER_INSTANCE = 2


def _contexts(files: Sequence[Output]) -> dict[str, set[str]]:
    """SOP Class -> Transfer Syntaxes to propose, from the job's records (the file meta only
    for outputs recorded before the database kept them)."""
    import pydicom

    wanted: dict[str, set[str]] = {}
    for output in files:
        sop_class, syntax = output.sop_class_uid, output.transfer_syntax_uid
        if sop_class is None or syntax is None:
            meta = pydicom.filereader.read_file_meta_info(output.path)
            sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        wanted.setdefault(sop_class, set()).add(syntax)
    return wanted


def send(files: Sequence[Output], destination: config.Destination, name: str, *,
         calling_ae: str, timeouts: Any,
         on_sent: Callable[[str], None] | None = None) -> int:
    """Send a job's outputs to ``destination`` in the order given; returns how many were sent.

    ``on_sent`` is called with the SOP Instance UID after each success status (to record the
    delivery)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    if not files:
        return 0
    where = f"{name} ({destination.ae_title}@{destination.host}:{destination.port})"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    for sop_class, syntaxes in _contexts(files).items():
        ae.add_requested_context(sop_class, sorted(syntaxes | {ExplicitVRLittleEndian,
                                                               ImplicitVRLittleEndian}))
    context = client_context(destination, name)
    tls_args = None if context is None else (context, destination.host)
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls_args)
    except OSError as exc:
        raise config.PeerError(f"cannot reach destination {where}: {exc}") from exc
    if assoc.is_rejected:
        raise config.PeerError(f"destination {where} rejected the association")
    if not assoc.is_established:
        raise config.PeerError(f"destination {where} is unreachable or aborted the association")
    sent = 0
    try:
        for uid, path, *_ in files:
            dataset = pydicom.dcmread(path)
            problem = ""
            for _ in range(ATTEMPTS_PER_INSTANCE):
                if not assoc.is_established:
                    raise config.PeerError(f"destination {where} dropped the association after "
                                           f"{sent} of {len(files)} instances")
                try:
                    status = assoc.send_c_store(dataset)
                except ValueError as exc:  # e.g. the peer accepted no context for this class
                    raise config.PeerError(f"destination {where} cannot take instance {uid}: "
                                           f"{exc}") from exc
                code = getattr(status, "Status", None)
                if code is not None and (code == 0 or code in (0xB000, 0xB007, 0xB006)):
                    break
                problem = ("no response (timeout or aborted association)" if code is None
                           else f"status 0x{int(code):04X}")
            else:
                raise config.PeerError(f"destination {where} refused instance {uid}: {problem}")
            sent += 1
            if on_sent is not None:
                on_sent(uid)
    finally:
        if assoc.is_established:
            assoc.release()
    return sent
