"""The node's Prometheus metrics (``/metrics``), all named ``vcemri_*``.

Counters are kept by the parts that see the events (the SCP: instances, bytes, associations;
the workers: synthesis seconds, deliveries); what the database and the disk know (jobs by
state, the age of the oldest waiting job, free space) is read at scrape time, so a scrape
always agrees with ``vcemri jobs`` and ``vcemri status``. One registry per node: two nodes in
one process (the tests) never share counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import jobs as states
from .jobs import JobQueue
from .spool import OUT_OF_RESOURCES, Spool

#: Synthesis time buckets (seconds): a CPU study takes 5-60 s, a GPU one 1-5 s.
SYNTHESIS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def refusal_kind(status: int, reason: str | None) -> str:
    """A refused instance's reason as a small set of label values (the reason itself is free
    text and would make a label per instance)."""
    text = (reason or "").lower()
    if status == OUT_OF_RESOURCES:
        return "out_of_resources"
    for needle, kind in (("pixel data", "pixel_data"), ("not a valid uid", "bad_uid"),
                         ("cannot move", "moved_uid"), ("received before in study", "moved_uid"),
                         ("header value", "header"), ("cannot be decoded", "undecodable"),
                         ("affected sop instance uid", "uid_mismatch")):
        if needle in text:
            return kind
    return "other"


class _Snapshot(Collector):
    """What the database and the disk say, read at each scrape."""

    def __init__(self, queue: JobQueue, spool: Spool) -> None:
        self.queue = queue
        self.spool = spool

    def collect(self) -> Iterator[Any]:
        counts = self.queue.counts()
        jobs = GaugeMetricFamily("vcemri_jobs", "jobs in each state", labels=["state"])
        for state in states.STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        oldest = self.queue.oldest_waiting()
        age = 0.0 if oldest is None else max(0.0, time.time() - oldest)
        yield GaugeMetricFamily(
            "vcemri_oldest_waiting_job_age_seconds",
            "seconds since the oldest unfinished job (waiting, ready, running, sending) was "
            "created (0 when none)", value=age)
        yield GaugeMetricFamily("vcemri_spool_free_bytes",
                                "free space on the spool's file system (bytes)",
                                value=self.spool.free_mib() * 2**20)


class Metrics:
    """The counters the SCP and the workers update, and the scrape output."""

    def __init__(self, queue: JobQueue, spool: Spool) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.instances = Counter("vcemri_instances_received", "instances stored and "
                                 "acknowledged", registry=registry)
        self.received_bytes = Counter("vcemri_received_bytes", "bytes of instances stored",
                                      registry=registry)
        self.refused = Counter("vcemri_instances_refused", "instances refused, by reason",
                               ["reason"], registry=registry)
        self.associations = Counter(
            "vcemri_associations", "associations and connections by outcome (accepted, "
            "rejected by AE title or limit, refused before association, released, aborted)",
            ["outcome"], registry=registry)
        self.synthesis = Histogram("vcemri_synthesis_seconds", "time from a job's start to "
                                   "its objects written (seconds)", buckets=SYNTHESIS_BUCKETS,
                                   registry=registry)
        self.deliveries = Counter("vcemri_deliveries", "objects delivered, per destination",
                                  ["destination"], registry=registry)
        self.delivery_failures = Counter(
            "vcemri_delivery_failures", "failed delivery attempts, per destination",
            ["destination"], registry=registry)
        self.worker_crashes = Counter(
            "vcemri_synthesis_process_crashes", "synthesis processes that died mid-job "
            "(killed, a native crash, out of memory); their jobs are retried",
            registry=registry)
        registry.register(_Snapshot(queue, spool))

    def exposition(self) -> bytes:
        """The text a Prometheus scrape gets."""
        return generate_latest(self.registry)
