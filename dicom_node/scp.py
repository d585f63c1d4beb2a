"""The C-ECHO / C-STORE SCP (pynetdicom): the node's front door.

Accepts MR Image Storage and Enhanced MR Image Storage in the uncompressed and the common
compressed transfer syntaxes; other storage SOP classes are acknowledged and discarded
(``dicom.other_storage: ignore``) or get no presentation context (``refuse``). The called AE
title and the calling-AE allow-list are checked at association time; rejections are logged
and audited with the reason. Every C-STORE is answered only after :class:`Spool` has made the
instance durable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from typing import Any

import config

from .commitment import STORAGE_COMMITMENT, CommitmentReports
from .metrics import Metrics, refusal_kind
from .spool import OUT_OF_RESOURCES, Received, Spool

log = logging.getLogger(__name__)

#: The longest A-ASSOCIATE-RQ a peer may announce (bytes): hundreds of presentation contexts
#: and a user identity fit in far less.
MAX_REQUEST_BYTES = 1_048_576

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
PROCESSED = (MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE)

#: Uncompressed and the common compressed transfer syntaxes pydicom's handlers decode.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",        # Explicit VR Little Endian
    "1.2.840.10008.1.2",          # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",     # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",        # Explicit VR Big Endian (retired, still sent by old scanners)
    "1.2.840.10008.1.2.4.70",     # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.57",     # JPEG Lossless
    "1.2.840.10008.1.2.4.50",     # JPEG Baseline
    "1.2.840.10008.1.2.4.51",     # JPEG Extended
    "1.2.840.10008.1.2.4.80",     # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",     # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",     # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",     # JPEG 2000
    "1.2.840.10008.1.2.5",        # RLE Lossless
)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _host_of(assoc: Any) -> str:
    """The peer's IP address of an association (empty before pynetdicom has set it)."""
    try:
        return str(assoc.requestor.address)
    except (AttributeError, ValueError):
        return ""


class StorageSCP:
    """The listening AE; :meth:`start` returns once the port is bound."""

    def __init__(self, settings: config.Settings, spool: Spool,
                 audit: config.AuditLog | None = None, metrics: Metrics | None = None,
                 reports: CommitmentReports | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.audit = audit
        self.metrics = metrics
        #: handles storage commitment reports from destinations that were asked
        self.reports = reports
        #: destinations' AE titles that dicom.allowed_calling_aes does not list: they may call
        #: only to report storage commitment (with no allow-list every AE may call anyway)
        allowed = set(settings.dicom.allowed_calling_aes)
        self.reporters = {d.ae_title for d in settings.destinations.values()
                          if d.storage_commitment} - allowed if allowed else set()
        self.server: Any = None
        self._counts: dict[int, Counter[str]] = {}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import StoragePresentationContexts

        import synthesis

        from .tls import server_context

        # the header reader (synthesis.series, which imports SimpleITK) loaded now, not by the
        # first C-STORE of the first association (which waited about 0.3 s for it here)
        synthesis.series_info  # noqa: B018
        node = self.settings.dicom
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.timeouts.acse_s
        ae.dimse_timeout = node.timeouts.dimse_s
        ae.network_timeout = node.timeouts.network_s
        ae.require_called_aet = node.check_called_ae
        ae.require_calling_aet = (list(node.allowed_calling_aes) + sorted(self.reporters)
                                  if node.allowed_calling_aes else [])
        # 1 MiB PDUs: a 256x256 16-bit slice in one PDU; measured 2x faster than pynetdicom's
        # 16 KiB default with dcmtk storescu (benchmarks/ingest.py). 0 ("no limit") is slower.
        ae.maximum_pdu_size = 1_048_576
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        if self.reports is not None:
            # a peer asked for storage commitment reports on an association of its own, in
            # the SCP role (PS3.4 J.3.3.1.2)
            ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        for sop_class in PROCESSED:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        if node.other_storage == "ignore":
            for context in StoragePresentationContexts:
                if context.abstract_syntax not in PROCESSED:
                    ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
        handlers = [
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_N_EVENT_REPORT, self._report),
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_ABORTED, self._ended),
        ]
        try:
            self.server = ae.start_server(
                (node.bind_address, node.port), block=False, evt_handlers=handlers,
                ssl_context=server_context(node))
        except OSError as exc:
            raise config.VcemriError(
                f"cannot listen on {node.bind_address}:{node.port}: {exc.strerror or exc}",
                hint="another program may use the port; change dicom.port") from exc
        log.info("listening on %s:%d as %s%s", node.bind_address, node.port, node.ae_title,
                 " (TLS)" if node.tls else "")
        self._guard_connections(self.server)

    def _refuse_connection(self, request: Any, address: Any, reason: str) -> None:
        host, port = (address[0], int(address[1])) if isinstance(address, tuple) else (
            str(address), 0)
        log.warning("connection from %s refused: %s", host, reason)
        self._count_association("refused")
        self._audit("association.refused", outcome="failure", reason=reason, peer_host=host,
                    peer_port=port)
        with contextlib.suppress(OSError):
            request.close()

    def _guard_connections(self, server: Any) -> None:
        """What a connection must do before pynetdicom makes it an association.

        pynetdicom does the TLS handshake inside ``accept`` (one peer that connects and sends
        nothing stops every other peer from connecting; a failed handshake leaves no trace),
        and counts a connection that has sent nothing against ``max_associations`` (ten idle
        connections refused every real association for the ACSE timeout). Here the accept
        loop only accepts; each connection's own thread then completes the TLS handshake
        within the ACSE timeout, waits at most ``dicom.timeouts.first_pdu_s`` for the first
        PDU, and, on plain TCP, checks that it announces an A-ASSOCIATE-RQ of a sane length
        (at most :data:`MAX_REQUEST_BYTES`; a request announcing a 1 GiB PDU made the node
        read it all). Only then does pynetdicom see the connection. A refusal is logged and
        audited (association.refused with the reason). One IP address may hold at most
        ``dicom.max_connections_per_address`` connections (being vetted, or associations),
        so that one host (a flood of connections or of real A-ASSOCIATE-RQs) cannot take every
        association from the others. (Instance attributes: pynetdicom builds the server class
        itself.)"""
        import select
        import socket
        import ssl
        import struct

        context = server.ssl_context
        finish = server.finish_request
        timeouts = self.settings.dicom.timeouts
        handshake_s = float(timeouts.acse_s or 30.0)
        first_pdu_s = float(timeouts.first_pdu_s)
        per_address = self.settings.dicom.max_connections_per_address
        vetting: Counter[str] = Counter()
        vetting_lock = threading.Lock()

        def admit(host: str) -> bool:
            """Count a new connection from ``host`` unless it holds its share already."""
            with vetting_lock:
                held = vetting[host] + sum(
                    1 for assoc in server.active_associations if _host_of(assoc) == host)
                if held >= per_address:
                    return False
                vetting[host] += 1
                return True

        def release(host: str) -> None:
            with vetting_lock:
                vetting[host] -= 1
                if vetting[host] <= 0:
                    del vetting[host]

        def get_request() -> tuple[Any, Any]:
            client, address = server.socket.accept()
            if context is None:
                return client, address
            return context.wrap_socket(client, server_side=True,
                                       do_handshake_on_connect=False), address

        def finish_request(request: Any, address: Any) -> None:
            host = str(address[0]) if isinstance(address, tuple) else str(address)
            if not admit(host):
                return self._refuse_connection(
                    request, address, f"too many connections from {host} (dicom."
                    f"max_connections_per_address is {per_address})")
            try:
                vet(request, address)
            finally:
                release(host)  # an association it became is counted by pynetdicom from here

        def vet(request: Any, address: Any) -> None:
            if context is not None:
                try:
                    request.settimeout(handshake_s)
                    request.do_handshake()
                    request.settimeout(None)
                except (ssl.SSLError, OSError) as exc:
                    reason = (f"TLS handshake failed: {exc.reason}"
                              if isinstance(exc, ssl.SSLError) and exc.reason
                              else f"TLS handshake failed: {exc}")
                    if isinstance(exc, TimeoutError):
                        reason = f"TLS handshake not completed within {handshake_s:g} s"
                    return self._refuse_connection(request, address, reason)
            pending = context is not None and request.pending()
            waiting = select.poll()  # poll, not select: no FD_SETSIZE limit on a busy node
            waiting.register(request, select.POLLIN)
            if not pending and not waiting.poll(first_pdu_s * 1000):
                return self._refuse_connection(
                    request, address, f"no A-ASSOCIATE-RQ within {first_pdu_s:g} s "
                    "(dicom.timeouts.first_pdu_s)")
            if context is None:
                try:
                    header = request.recv(6, socket.MSG_PEEK)
                except OSError as exc:
                    return self._refuse_connection(request, address,
                                                   f"connection lost before its first PDU: "
                                                   f"{exc.strerror or exc}")
                if len(header) == 6:
                    kind, length = header[0], struct.unpack(">I", header[2:6])[0]
                    if kind != 0x01 or length > MAX_REQUEST_BYTES:
                        return self._refuse_connection(
                            request, address, f"the first PDU (type 0x{kind:02X}, {length} "
                            "bytes) is not an A-ASSOCIATE-RQ of at most "
                            f"{MAX_REQUEST_BYTES} bytes")
            finish(request, address)

        server.get_request = get_request
        server.finish_request = finish_request

    def stop(self) -> None:
        """Stop accepting; in-flight C-STOREs finish their write (each is one handler call)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else 0

    def _audit(self, event: str, **fields: Any) -> None:
        """Audit without ever breaking a DICOM exchange: a failing audit log (a full disk)
        is logged as an error and the answer to the peer still goes out."""
        if self.audit is None:
            return
        try:
            self.audit.record(event, **fields)
        except config.StorageError as exc:
            log.error("audit record %s not written: %s", event, exc.reason)
        except ValueError as exc:  # a field the peer sent that the PHI policy refuses
            log.error("audit record %s not written: %s", event, exc)

    # -- handlers -----------------------------------------------------------------------------

    def _peer(self, event: Any) -> dict[str, Any]:
        requestor = event.assoc.requestor
        return {"calling_ae": _text(requestor.ae_title) or "-",
                "peer_host": str(requestor.address), "peer_port": int(requestor.port)}

    def _echo(self, event: Any) -> int:
        return 0x0000

    def _count_association(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.associations.labels(outcome).inc()

    def _established(self, event: Any) -> None:
        self._count_association("accepted")
        with self._lock:
            self._counts[id(event.assoc)] = Counter()
        self._audit("association.accepted", **self._peer(event),
                    called_ae=self.settings.dicom.ae_title)

    def _rejected(self, event: Any) -> None:
        node = self.settings.dicom
        peer = self._peer(event)
        called = _text(getattr(event.assoc.requestor.primitive, "called_ae_title", ""))
        if node.check_called_ae and called != node.ae_title:
            reason = f"called AE title {called!r} is not ours ({node.ae_title!r})"
        elif node.allowed_calling_aes and peer["calling_ae"] not in node.allowed_calling_aes:
            reason = (f"calling AE title {peer['calling_ae']!r} is not in "
                      "dicom.allowed_calling_aes")
        else:
            reason = f"too many associations (dicom.max_associations is {node.max_associations})"
        self._count_association("rejected")
        log.warning("association from %s (%s) rejected: %s", peer["calling_ae"],
                    peer["peer_host"], reason)
        self._audit("association.rejected", outcome="failure", reason=reason, **peer,
                    called_ae=called or "-")

    def _ended(self, event: Any) -> None:
        with self._lock:
            counts = self._counts.pop(id(event.assoc), Counter())
        aborted = event.event.name == "EVT_ABORTED"
        self._count_association("aborted" if aborted else "released")
        self._audit("association.aborted" if aborted else "association.released",
                    outcome="failure" if aborted else "success", **self._peer(event),
                    count=counts["stored"],
                    reason=(f"{counts['ignored']} ignored, {counts['failed']} refused"
                            if counts["ignored"] or counts["failed"] else None))
        if counts:
            log.info("association from %s %s: %d stored, %d ignored, %d failed",
                     self._peer(event)["calling_ae"], "aborted" if aborted else "released",
                     counts["stored"], counts["ignored"], counts["failed"])

    def _count(self, event: Any, what: str) -> None:
        with self._lock:
            self._counts.setdefault(id(event.assoc), Counter())[what] += 1

    def _report(self, event: Any) -> tuple[int, None]:
        """pynetdicom's N-EVENT-REPORT handler: (status, no reply dataset)."""
        if self.reports is None:  # no context for it was offered; answer all the same
            return 0x0110, None
        try:
            return self.reports.handle(event), None
        except Exception:  # a response must always go back
            log.exception("handling a storage commitment report failed")
            return 0x0110, None

    def _store(self, event: Any) -> int:
        # the negotiated context, not the command's (unchecked) AffectedSOPClassUID
        sop_class = str(event.context.abstract_syntax)
        peer = self._peer(event)
        if peer["calling_ae"] in self.reporters:  # allowed to call for reports only
            self._count(event, "failed")
            self._audit("instance.refused", outcome="failure", sop_class_uid=sop_class,
                        calling_ae=peer["calling_ae"], status="0x0124",
                        reason="a destination may call this node only to report storage "
                        "commitment (add it to dicom.allowed_calling_aes to let it send)")
            return 0x0124
        if sop_class not in PROCESSED:
            self._count(event, "ignored")
            self._audit("instance.ignored", sop_class_uid=sop_class, calling_ae=peer["calling_ae"],
                        reason="not MR or Enhanced MR (dicom.other_storage: ignore)")
            return 0x0000
        encoded = event.encoded_dataset()
        try:
            received = self.spool.store(
                encoded, peer["calling_ae"],
                announced=str(event.request.AffectedSOPInstanceUID or "").rstrip("\0 "))
        except Exception as exc:  # a response must always go back; the reason is audited
            log.exception("storing an instance failed")
            received = Received(OUT_OF_RESOURCES, f"internal error while storing: {exc}")
        if received.status != 0:
            self._count(event, "failed")
            if self.metrics is not None:
                self.metrics.refused.labels(
                    refusal_kind(received.status, received.reason)).inc()
            ids = {k: v for k, v in (("sop_instance_uid", received.sop_instance_uid),
                                     ("series_uid", received.series_uid),
                                     ("study_uid", received.study_uid)) if v}
            log.warning("instance from %s refused (0x%04X): %s", peer["calling_ae"],
                        received.status, received.reason)
            self._audit("instance.refused", outcome="failure", reason=received.reason,
                        status=f"0x{received.status:04X}", sop_class_uid=sop_class,
                        calling_ae=peer["calling_ae"], **ids)
            return received.status
        self._count(event, "stored")
        if self.metrics is not None:
            self.metrics.instances.inc()
            self.metrics.received_bytes.inc(len(encoded))
        if received.replaced:
            log.warning("instance %s resent with other content: kept as a new version (the "
                        "earlier one stays for the jobs that used it); its series counts as "
                        "changed", received.sop_instance_uid)
            self._audit("instance.replaced", calling_ae=peer["calling_ae"],
                        reason=f"resent with other content (SHA-256 {received.replaced[:12]}... "
                        "before); kept as a new version, the earlier one kept too",
                        sop_instance_uid=received.sop_instance_uid,
                        series_uid=received.series_uid, study_uid=received.study_uid)
        if received.ignored:
            ignored = ", ".join(received.ignored)
            log.warning("instance %s: %s not a number; ignored", received.sop_instance_uid,
                        ignored)
            self._audit("instance.header_ignored", calling_ae=peer["calling_ae"],
                        reason=f"{ignored}: not a number; ignored for classification and "
                        "routing", sop_instance_uid=received.sop_instance_uid,
                        series_uid=received.series_uid, study_uid=received.study_uid)
        return 0x0000
