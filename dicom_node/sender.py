"""C-STORE SCU: results to a destination (TPS, PACS), one association per job.

Each instance is tried twice within the association; an instance the peer keeps refusing, a
refused association or a peer that cannot be reached raise :class:`config.PeerError` with the
reason, and the job retries later (``dicom_node.worker``). Instances already delivered are
skipped, so a retried job never sends one twice.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import config

from .jobs import Output
from .tls import client_context

log = logging.getLogger(__name__)

ATTEMPTS_PER_INSTANCE = 2


def sop_class_and_syntax(output: Output) -> tuple[str, str]:
    """An output's SOP Class and Transfer Syntax: from the job's records, or from the file
    meta for outputs recorded before the database kept them (schema version < 2)."""
    import pydicom

    if output.sop_class_uid is not None and output.transfer_syntax_uid is not None:
        return output.sop_class_uid, output.transfer_syntax_uid
    meta = pydicom.filereader.read_file_meta_info(output.path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def _contexts(files: Sequence[Output]) -> dict[str, set[str]]:
    """SOP Class -> Transfer Syntaxes to propose, for a job's outputs."""
    wanted: dict[str, set[str]] = {}
    for output in files:
        sop_class, syntax = sop_class_and_syntax(output)
        wanted.setdefault(sop_class, set()).add(syntax)
    return wanted


def _why_not_established(destination: config.Destination, context: ssl.SSLContext | None,
                         timeout_s: float) -> str:
    """Why an association could not be made, found by connecting again without DICOM:
    pynetdicom only logs the cause (a refused connection, a certificate that fails
    verification), and a job's reason must name it."""
    host, port = destination.host, destination.port
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            if context is None:
                return "it accepted the connection, then closed or aborted the association"
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(min(timeout_s, 1.0))
                try:
                    tls.recv(1)  # a server that refuses our certificate says so here
                except TimeoutError:
                    pass
                return "TLS succeeded, then the peer closed or aborted the association"
    except ssl.SSLCertVerificationError as exc:
        return f"TLS verification failed: {exc.verify_message or exc}"
    except ssl.SSLError as exc:
        return f"TLS failed: {exc.reason or exc}"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"


def associate(destination: config.Destination, name: str, *, calling_ae: str, timeouts: Any,
              contexts: dict[str, set[str]]) -> Any:
    """An established association with ``destination`` proposing ``contexts`` (SOP Class ->
    Transfer Syntaxes); raises :class:`config.PeerError` naming why there is none."""
    from pynetdicom import AE, evt

    where = f"{name} ({destination.ae_title}@{destination.host}:{destination.port})"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    context = client_context(destination, name)
    tls_args = None if context is None else (context, destination.host)
    rejections: list[Any] = []  # primitives the ACSE received
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls_args, evt_handlers=[
                                 (evt.EVT_ACSE_RECV, lambda event: rejections.append(
                                     event.primitive))])
    except OSError as exc:
        raise config.PeerError(f"cannot reach destination {where}: {exc}") from exc
    if assoc.is_rejected:
        detail = ""
        answers = [p for p in rejections if getattr(p, "result", None) in (0x01, 0x02)]
        if answers:  # the A-ASSOCIATE-RJ pynetdicom only logs
            primitive = answers[0]
            detail = (f": {primitive.reason_str} ({primitive.result_str}, by the "
                      f"{primitive.source_str})")
        raise config.PeerError(f"destination {where} rejected the association{detail}")
    if not assoc.is_established:
        cause = _why_not_established(destination, context, float(timeouts.acse_s or 10))
        raise config.PeerError(f"cannot associate with destination {where}: {cause}")
    return assoc


def send(files: Sequence[Output], destination: config.Destination, name: str, *,
         calling_ae: str, timeouts: Any,
         on_sent: Callable[[str], None] | None = None) -> int:
    """Send a job's outputs to ``destination`` in the order given; returns how many were sent.

    ``on_sent`` is called with the SOP Instance UID after each success status (to record the
    delivery)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not files:
        return 0
    where = f"{name} ({destination.ae_title}@{destination.host}:{destination.port})"
    assoc = associate(destination, name, calling_ae=calling_ae, timeouts=timeouts, contexts={
        sop_class: syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        for sop_class, syntaxes in _contexts(files).items()})
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
