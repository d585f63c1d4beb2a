"""Network edge and orchestration: C-STORE SCP, spool, series assembly, routing, job queue,
workers (synthesis through ``planning.SynthesisService``), sender, and the ``serve`` and
``jobs`` commands. Imports ``config``, ``synthesis`` and ``planning``.
"""

from .assembly import Assembler, choose_route
from .cli import add_commands
from .commitment import Commitment, CommitmentLedger, CommitmentReports
from .jobs import (
    ACTIVE,
    STATES,
    TERMINAL,
    Job,
    JobChanged,
    JobQueue,
    Output,
    backoff_s,
    output_folder,
)
from .lineage import input_change, superseded
from .node import Node
from .retention import Purge, purge, purge_for_space
from .scp import StorageSCP
from .sender import send
from .spool import Received, Spool
from .synthesis_process import SynthesisCrashed, SynthesisProcess
from .worker import Worker

__all__ = [
    "ACTIVE",
    "STATES",
    "TERMINAL",
    "Assembler",
    "Commitment",
    "CommitmentLedger",
    "CommitmentReports",
    "input_change",
    "superseded",
    "Job",
    "JobChanged",
    "JobQueue",
    "Node",
    "Output",
    "Purge",
    "Received",
    "Spool",
    "StorageSCP",
    "SynthesisCrashed",
    "SynthesisProcess",
    "Worker",
    "add_commands",
    "backoff_s",
    "choose_route",
    "output_folder",
    "purge",
    "purge_for_space",
    "send",
]
