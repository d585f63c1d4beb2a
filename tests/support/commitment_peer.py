"""A PACS that acknowledges every C-STORE but may lose objects, and tells the truth when asked
to commit them (Storage Commitment Push Model SCP, pynetdicom): the case storage commitment
exists for. Orthanc covers the honest peer; this one decides per object whether to keep it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import StoragePresentationContexts

from .processes import free_port

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
NO_SUCH_OBJECT_INSTANCE = 0x0112


class LosingPACS:
    """Listens on a free port as ``ae_title``; ``lose(dataset)`` True drops an object after
    acknowledging it. Reports go to ``reply_to`` (host, port, AE title) on a new association,
    as PS3.4 J.3.3.1.2 allows."""

    def __init__(self, ae_title: str = "PACS",
                 lose: Callable[[Dataset], bool] = lambda ds: False) -> None:
        self.ae_title = ae_title
        self.lose = lose
        self.port = free_port()
        self.kept: set[str] = set()
        self.stored: Counter[str] = Counter()  # C-STOREs acknowledged per SOP Instance UID
        self.reports: list[tuple[int, list[str]]] = []  # (event type, failed UIDs)
        self.reply_to: tuple[str, int, str] | None = None
        ae = AE(ae_title=ae_title)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(STORAGE_COMMITMENT)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])

    def _store(self, event: Any) -> int:
        dataset = event.dataset
        uid = str(dataset.SOPInstanceUID)
        self.stored[uid] += 1
        if not self.lose(dataset):
            self.kept.add(uid)
        return 0x0000

    def _action(self, event: Any) -> tuple[int, None]:
        request = event.action_information
        threading.Thread(target=self._report, args=(request,), daemon=True).start()
        return 0x0000, None

    def _report(self, request: Dataset) -> None:
        time.sleep(0.2)  # after the N-ACTION response, on an association of its own
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        done, failed = [], []
        for item in request.ReferencedSOPSequence:
            reference = Dataset()
            reference.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            reference.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            if str(item.ReferencedSOPInstanceUID) in self.kept:
                done.append(reference)
            else:
                reference.FailureReason = NO_SUCH_OBJECT_INSTANCE
                failed.append(reference)
        if done:
            report.ReferencedSOPSequence = done
        if failed:
            report.FailedSOPSequence = failed
        assert self.reply_to is not None
        host, port, called = self.reply_to
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT)
        assoc = ae.associate(host, port, ae_title=called,
                             ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)])
        if not assoc.is_established:
            return
        event_type = 2 if failed else 1
        status, _ = assoc.send_n_event_report(report, event_type, STORAGE_COMMITMENT,
                                           STORAGE_COMMITMENT_INSTANCE)
        assoc.release()
        if getattr(status, "Status", None) == 0:
            self.reports.append((event_type, [str(f.ReferencedSOPInstanceUID) for f in failed]))

    def stop(self) -> None:
        self.server.shutdown()

    def __enter__(self) -> LosingPACS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
