"""The typed configuration of a vcemri node and its tools.

One YAML file (see ``config/default.yaml``, which mirrors the defaults below exactly) validated
by these pydantic models, with ``VCEMRI_<SECTION>__<KEY>`` environment variables overriding it.
Unknown keys are errors everywhere. Times are in seconds, sizes in MiB, paths are resolved
against the directory of the YAML file (``~`` is expanded).

Regular expressions are Python ``re`` patterns, *searched* (not full-matched) and
case-insensitive; anchor them with ``^...$`` for an exact match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .types import (
    AETitle,
    AnyPath,
    Device,
    ExistingFile,
    Host,
    Regex,
    Seconds,
    TcpPort,
    resolve_path,
)

ENV_PREFIX = "VCEMRI_"
ENV_DELIMITER = "__"

#: The names of the models shipped with vcemri (synthesis.BUILTIN_MODELS maps each to its
#: file): kept here so that ``vcemri config check`` refuses a misspelt one, since this package
#: imports no other.
BUILTIN_MODEL_NAMES = ("builtin", "builtin:randomised-sites")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------------------------
# DICOM node
# --------------------------------------------------------------------------------------------


class Timeouts(_Section):
    """Association timeouts of the SCP and the sender, in seconds."""

    acse_s: Seconds = Field(30.0, description="ACSE (association request/release) timeout")
    dimse_s: Seconds = Field(60.0, description="DIMSE message timeout")
    network_s: Seconds = Field(60.0, description="idle network timeout of an association")
    first_pdu_s: Seconds = Field(
        10.0, description="a new connection must send its A-ASSOCIATE-RQ within this time")


class ServerTLS(_Section):
    """TLS for the node's SCP (PS3.15 Annex B); absent means plain TCP."""

    certificate: ExistingFile = Field(description="server certificate chain (PEM)")
    private_key: ExistingFile = Field(description="private key of the certificate (PEM)")
    ca_certificates: ExistingFile | None = Field(
        None, description="CA bundle (PEM) used to verify client certificates"
    )
    require_client_certificate: bool = Field(
        False, description="refuse clients without a certificate signed by ca_certificates"
    )

    @model_validator(mode="after")
    def _client_verification_needs_ca(self) -> ServerTLS:
        if self.require_client_certificate and self.ca_certificates is None:
            raise PydanticCustomError(
                "tls",
                "require_client_certificate is true but no ca_certificates file is given "
                "to verify client certificates with",
            )
        return self


class ClientTLS(_Section):
    """TLS towards a destination; absent means plain TCP."""

    ca_certificates: ExistingFile | None = Field(
        None, description="CA bundle (PEM) to verify the peer; none uses the system store"
    )
    certificate: ExistingFile | None = Field(None, description="client certificate (PEM)")
    private_key: ExistingFile | None = Field(None, description="client private key (PEM)")
    verify_hostname: bool = Field(True, description="check the peer certificate's host name")

    @model_validator(mode="after")
    def _certificate_and_key_together(self) -> ClientTLS:
        if (self.certificate is None) != (self.private_key is None):
            raise PydanticCustomError(
                "tls", "certificate and private_key must be given together (or neither)"
            )
        return self


class DicomNode(_Section):
    """The node's DICOM service (C-ECHO, C-STORE SCP)."""

    ae_title: AETitle = Field("VCEMRI", description="our AE title (called AE)")
    bind_address: Host = Field(
        "127.0.0.1", description="address to listen on; 0.0.0.0 for all interfaces"
    )
    port: TcpPort = Field(11112, description="TCP port to listen on")
    check_called_ae: bool = Field(
        True, description="refuse associations addressed to another AE title"
    )
    allowed_calling_aes: list[AETitle] = Field(
        default_factory=list,
        description="calling AE titles accepted; empty accepts any (not for production)",
    )
    max_associations: int = Field(10, ge=1, description="concurrent associations")
    max_connections_per_address: int = Field(
        5, ge=1,
        description="connections one IP address may hold at once, associations and "
        "connections that have not yet sent their A-ASSOCIATE-RQ together; more are closed at "
        "once and audited, so that one host cannot take every association",
    )
    other_storage: Literal["ignore", "refuse"] = Field(
        "ignore",
        description="storage SOP classes other than MR and Enhanced MR: ignore (acknowledge, "
        "audit, discard) or refuse (no presentation context)",
    )
    timeouts: Timeouts = Field(default_factory=Timeouts, description="in seconds")
    tls: ServerTLS | None = Field(None, description="TLS settings; null for plain TCP")


# --------------------------------------------------------------------------------------------
# Storage, assembly, series classification
# --------------------------------------------------------------------------------------------


class Storage(_Section):
    """Where received instances, jobs, results and the audit log live."""

    root: AnyPath = Field(
        Path("~/.local/share/vcemri"), description="data directory (spool, jobs, outputs)"
    )
    min_free_mib: int = Field(
        1024, ge=0, description="refuse new instances when less disk space than this is free"
    )
    audit_log: AnyPath | None = Field(
        None, description="append-only audit log (JSON lines); null: <root>/audit.jsonl"
    )
    retention_days: float | None = Field(
        None, gt=0, description="delete the spooled inputs and the outputs of jobs finished "
        "this many days ago (hourly; never an unfinished job's); null: keep everything")
    retention_free_mib: int | None = Field(
        None, gt=0, description="while less disk space than this is free, delete the spooled "
        "inputs and outputs of finished jobs, oldest first (checked every minute; never an "
        "unfinished job's); null: no free-space target")

    @property
    def audit_log_path(self) -> Path:
        """The audit log's path, defaulting to ``<root>/audit.jsonl``."""
        return self.audit_log if self.audit_log is not None else self.root / "audit.jsonl"


class Assembly(_Section):
    """When a series counts as complete and how long a study waits for its other sequence."""

    series_idle_s: Seconds = Field(
        10.0, description="a series is complete this long after its last instance"
    )
    study_timeout_s: Seconds = Field(
        600.0, description="a study fails if its T1w or T2w has not arrived by then"
    )
    incomplete_wait_s: Seconds = Field(
        300.0, description="a series with a gap between its slice positions, or fewer "
        "instances than it announces (ImagesInAcquisition), waits this long after its last "
        "instance for the rest; then its study fails with the reason"
    )


class Celery(_Section):
    """Synthesis on Celery workers (``vcemri worker``) when ``jobs.backend`` is celery.

    The node keeps the job states (SQLite) and delivers to the TPS; it sends each study to be
    synthesized as a Celery task to a queue per device class, and a worker, on any machine that
    mounts the node's ``storage.root`` (a shared spool path: NFS or SMB), reads the inputs there
    and writes the outputs there. A task is acknowledged only after it ran (acks late): a worker
    that dies mid-job leaves its task to be run again by another worker after the visibility
    timeout; output UIDs depend only on the inputs and the model, so the TPS receives one
    series however often a task ran."""

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker: redis://[:password@]host:port/db"
        " (rediss:// for TLS), or amqp://user:password@host// for RabbitMQ"
    )
    result_backend: str | None = Field(
        None, description="where workers leave results (null: the Redis broker_url; set a "
        "redis:// URL when the broker is RabbitMQ)"
    )
    queue_prefix: str = Field(
        "vcemri", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
        description="queues are <prefix>.cpu (models on cpu or auto) and <prefix>.gpu (models "
        "on cuda): a worker without a GPU never takes a job routed to a GPU model"
    )
    in_flight: int = Field(
        4, ge=1, le=256, description="jobs the node keeps dispatched to workers at once"
    )
    visibility_timeout_s: Seconds = Field(
        900.0, description="a task whose worker died is given to another worker this long "
        "after it was taken (longer than any synthesis: a slower one may run twice)"
    )
    task_timeout_s: Seconds = Field(
        3600.0, description="the node dispatches a job again when no worker returned its "
        "result within this time (e.g. the broker lost the task)"
    )

    @model_validator(mode="after")
    def _redis_results(self) -> Celery:
        backend = self.result_backend or self.broker_url
        if not backend.startswith(("redis://", "rediss://")):
            raise PydanticCustomError(
                "result_backend", "result_backend must be a redis:// URL (set it when the "
                "broker is not Redis)", {})
        return self


class Jobs(_Section):
    """The job queue: workers, retries and how long results are re-sent to a peer that is down."""

    backend: Literal["sqlite", "celery"] = Field(
        "sqlite", description="sqlite: synthesis in worker processes of the node; celery: on "
        "`vcemri worker` processes anywhere, through jobs.celery's broker (job states stay in "
        "the node's SQLite either way)"
    )
    workers: int = Field(1, ge=1, le=64, description="jobs processed at the same time "
                         "(sqlite backend; celery: jobs.celery.in_flight and the workers' "
                         "--concurrency)")
    celery: Celery = Field(default_factory=Celery, description="the celery backend's broker, "
                           "queues and timeouts")
    max_attempts: int = Field(
        3, ge=1, description="processing attempts before a job fails (errors that may pass)"
    )
    retry_initial_s: Seconds = Field(
        5.0, description="first retry delay; doubles each attempt, with +-25 % jitter"
    )
    retry_max_s: Seconds = Field(300.0, description="longest delay between retries")
    send_max_age_s: Seconds = Field(
        3600.0, description="a job whose destination stays unreachable this long fails"
    )


class Range(_Section):
    """An inclusive numeric range; either end may be open."""

    min: float | None = Field(None, description="lowest allowed value (inclusive)")
    max: float | None = Field(None, description="highest allowed value (inclusive)")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise PydanticCustomError(
                "range", "min {min} is greater than max {max}", {"min": self.min, "max": self.max}
            )
        return self

    def __contains__(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def _search(patterns: list[str], text: str) -> bool:
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class SeriesRule(_Section):
    """Header rule that recognizes one kind of series.

    A series matches when its SeriesDescription matches one of ``description`` (or the list is
    empty), matches none of ``exclude_description``, every given parameter range contains the
    header's value (a missing value fails the rule: it cannot prove the sequence) and the
    contrast agent condition holds (ContrastBolusAgent present and not empty).
    """

    description: list[Regex] = Field(
        default_factory=list, description="SeriesDescription must match one; empty: any"
    )
    exclude_description: list[Regex] = Field(
        default_factory=list, description="SeriesDescription must match none"
    )
    repetition_time_ms: Range | None = Field(None, description="RepetitionTime range (ms)")
    echo_time_ms: Range | None = Field(None, description="EchoTime range (ms)")
    inversion_time_ms: Range | None = Field(None, description="InversionTime range (ms)")
    contrast_agent: Literal["absent", "present", "any"] = Field(
        "any", description="ContrastBolusAgent must be absent, present, or either"
    )

    @model_validator(mode="after")
    def _has_a_condition(self) -> SeriesRule:
        if not (
            self.description
            or self.repetition_time_ms
            or self.echo_time_ms
            or self.inversion_time_ms
            or self.contrast_agent != "any"
        ):
            raise PydanticCustomError(
                "rule",
                "a series rule needs at least one condition (description, a parameter range "
                "or contrast_agent); an empty rule would match every series",
            )
        return self

    def matches(self, header: Mapping[str, Any]) -> bool:
        """Whether a series with these header values (DICOM keywords) satisfies the rule."""
        text = str(header.get("SeriesDescription") or "")
        if self.description and not _search(self.description, text):
            return False
        if _search(self.exclude_description, text):
            return False
        for keyword, allowed in (
            ("RepetitionTime", self.repetition_time_ms),
            ("EchoTime", self.echo_time_ms),
            ("InversionTime", self.inversion_time_ms),
        ):
            if allowed is not None:
                value = _number(header.get(keyword))
                if value is None or value not in allowed:
                    return False
        has_agent = bool(str(header.get("ContrastBolusAgent") or "").strip())
        return self.contrast_agent == "any" or has_agent == (self.contrast_agent == "present")


_CONTRAST_WORDS = [r"\+c", r"c\+", r"post", r"gad", r"\bgd\b", r"contrast", r"\bce\b", r"enhanc"]
_OURS = [r"synthetic", r"\bvce"]


def _unenhanced(*patterns: str, exclude: tuple[str, ...] = ()) -> SeriesRule:
    """A default rule for a contrast-free input series described by one of ``patterns``."""
    return SeriesRule(description=list(patterns),
                      exclude_description=_CONTRAST_WORDS + _OURS + list(exclude),
                      contrast_agent="absent")


class SeriesRules(_Section):
    """How incoming series are recognized: T1w, T2w (plain, fat-suppressed, STIR), DWI, ADC
    or contrast-enhanced T1w."""

    t1w: SeriesRule = Field(
        description="contrast-free T1-weighted (model input)",
        default_factory=lambda: _unenhanced(r"t1(?![0-9])"),
    )
    t2w: SeriesRule = Field(
        description="T2-weighted or STIR (model input)",
        default_factory=lambda: _unenhanced(r"t2(?![0-9*])", r"stir"),
    )
    t2w_fs: SeriesRule = Field(
        description="fat-suppressed T2-weighted (input of models trained with it; fills a "
                    "model's T2w input when no plain T2w is there); a T2w whose ScanOptions "
                    "say FS is one too",
        default_factory=lambda: _unenhanced(r"t2.*(fs(?![a-z])|fat.?sat|spair|spir(?![a-z]))",
                                            r"(\bfs(?![a-z])|fat.?sat|spair).*t2"),
    )
    stir: SeriesRule = Field(
        description="short-tau inversion recovery (fills a model's T2w input when neither a "
                    "plain nor a fat-suppressed T2w is there)",
        default_factory=lambda: _unenhanced(r"stir", r"t2.*tirm", r"tirm.*t2"),
    )
    dwi: SeriesRule = Field(
        description="diffusion-weighted (read at its highest b-value); a series whose "
                    "DiffusionBValue is above 0 is one whatever its description",
        default_factory=lambda: _unenhanced(r"diff", r"\bdwi\b", r"trace", r"\bb ?1000\b",
                                            exclude=(r"(?<![a-z])adc(?![a-z])",)),
    )
    adc: SeriesRule = Field(
        description="apparent diffusion coefficient map; ImageType ADC is one whatever its "
                    "description",
        default_factory=lambda: SeriesRule(
            description=[r"(?<![a-z])adc(?![a-z])", r"apparent diffusion"],
            exclude_description=list(_OURS)
        )
    )
    contrast_enhanced: SeriesRule = Field(
        description="acquired contrast-enhanced T1w (training target; never a model input)",
        default_factory=lambda: SeriesRule(
            description=list(_CONTRAST_WORDS), exclude_description=list(_OURS)
        )
    )


# --------------------------------------------------------------------------------------------
# Routing, destinations, models
# --------------------------------------------------------------------------------------------


_ROUTE_KEYWORDS = {
    "calling_ae": "CallingAETitle",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "institution": "InstitutionName",
    "series_description": "SeriesDescription",
}


class RouteMatch(_Section):
    """Header conditions of a route; every given pattern must match (absent ones always do)."""

    calling_ae: Regex | None = Field(None, description="AE title that sent the study")
    modality: Regex | None = Field("^MR$", description="Modality")
    body_part: Regex | None = Field(None, description="BodyPartExamined")
    institution: Regex | None = Field(None, description="InstitutionName")
    series_description: Regex | None = Field(None, description="SeriesDescription of the T1w")

    def matches(self, header: Mapping[str, Any]) -> bool:
        """Whether a study with these values (DICOM keywords, plus ``CallingAETitle``) matches."""
        for field, keyword in _ROUTE_KEYWORDS.items():
            pattern = getattr(self, field)
            if pattern is not None and not re.search(
                pattern, str(header.get(keyword) or ""), re.IGNORECASE
            ):
                return False
        return True


class Route(_Section):
    """A routing rule: studies matching ``match`` go through ``model`` to ``destinations``.

    Rules are tried in order and the first match wins; studies matching no rule are kept,
    not processed, and logged.
    """

    name: str = Field(min_length=1, description="unique name, used in logs and the audit")
    match: RouteMatch = Field(default_factory=RouteMatch, description="conditions, all must hold")
    model: str = Field("default", description="key into models")
    destinations: list[str] = Field(
        default_factory=list, description="keys into destinations; empty keeps results locally"
    )
    series_idle_s: Seconds | None = Field(
        None, description="this route's series are complete this long after their last "
        "instance (null: assembly.series_idle_s); matched on each series' own header"
    )
    expected_instances: dict[Literal["t1w", "t2w", "t2w_fs", "stir", "dwi", "adc"], int] = Field(
        default_factory=dict, description="this route's series of a role are complete as soon "
        "as they hold this many instances, e.g. {t1w: 30, t2w: 30, dwi: 60} (a scanner "
        "protocol's instance counts; ImagesInAcquisition in a header takes precedence; a "
        "fat-suppressed T2w or STIR without a count of its own takes the t2w count)"
    )


class Destination(_Section):
    """A DICOM peer the results are sent to (a TPS or PACS)."""

    ae_title: AETitle = Field(description="the peer's AE title (called AE)")
    host: Host = Field(description="the peer's IP address or host name")
    port: TcpPort = Field(description="the peer's TCP port")
    tls: ClientTLS | None = Field(None, description="TLS settings; null for plain TCP")
    storage_commitment: bool = Field(
        False, description="ask the peer to commit every object (Storage Commitment Push "
        "Model): a job is done only when it has; the peer reports to this node's port"
    )
    commitment_timeout_s: Seconds = Field(
        600.0, description="how long to wait for the peer's commitment report before asking "
        "again (until jobs.send_max_age_s)"
    )


class ModelChoice(_Section):
    """A synthesis model and where it runs."""

    checkpoint: str = Field(
        "builtin", description="'builtin' for the shipped weights, 'builtin:NAME' for "
        "another shipped model (README: Unseen protocols), or a checkpoint file"
    )
    device: Device = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    batch_size: int = Field(8, ge=1, description="slices per forward pass")
    keep_t1w_detail: bool = Field(
        False, description="add back to the VCE the T1w detail that the round trip through "
        "the model's 256x224 grid removes: sharper as delivered for matrices finer than the "
        "grid; the confidence map does not model it (README: As delivered)"
    )

    second_opinion: str | None = Field(
        None, description="a second model ('builtin', 'builtin:NAME' or a checkpoint file) "
        "whose confidence map joins this model's: the delivered map is the lower of the two "
        "per pixel, so the low-confidence helper marks where either model expects a large "
        "error (README: Unseen protocols); costs a second model pass per study"
    )

    @field_validator("checkpoint", "second_opinion")
    @classmethod
    def _checkpoint_exists(cls, value: str | None) -> str | None:
        if value is None or value in BUILTIN_MODEL_NAMES:
            return value
        if value.startswith("builtin:"):
            raise PydanticCustomError(
                "checkpoint", "there is no built-in model '{name}' (the built-in models are "
                "{names})", {"name": value, "names": ", ".join(BUILTIN_MODEL_NAMES)})
        path = resolve_path(value)
        if not path.is_file():
            raise PydanticCustomError(
                "checkpoint",
                "checkpoint file '{path}' does not exist (use 'builtin' for the shipped model, "
                "'builtin:NAME' for another shipped one)",
                {"path": str(path)},
            )
        return str(path)


class LoggingSettings(_Section):
    """Console logging. The PHI policy (config.phi) applies to both formats."""

    format: Literal["human", "json"] = Field("human", description="human or json (JSON lines)")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="least severe level shown"
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class PlanningSettings(_Section):
    """What is written for the treatment planning system."""

    series_description: str = Field(
        "VCE-MRI SYNTHETIC ({model})",
        description="synthetic series description; {model} is replaced by the model name",
    )
    series_number_offset: int = Field(
        1000, ge=1, description="synthetic SeriesNumber = the T1w's SeriesNumber + this"
    )
    burn_in_marker: bool = Field(
        False, description="burn 'SYNTHETIC' into the pixels (BurnedInAnnotation YES)"
    )
    helper_prefix: str = Field(
        "zVCE_", min_length=1, max_length=10, description="prefix of every helper ROI name"
    )
    enhancement_threshold: float = Field(
        0.3, gt=0, description="enhancement helper: VCE >= (1 + this) x T1w"
    )
    min_region_mm3: float = Field(
        50.0, ge=0, description="helper regions smaller than this are dropped (mm^3)"
    )
    low_confidence_threshold: float = Field(
        0.5, gt=0, lt=1, description="low-confidence helper: confidence below this "
        "(0.5: an error estimate of half the T1w's head standard deviation; the shipped "
        "model's is exceeded with probability 0.3)"
    )
    refusal_notice: bool = Field(
        False, description="when screening refuses a study, send the route's destinations a "
        "Secondary Capture that says so and why (nothing synthetic is sent either way)"
    )


def _default_routes() -> list[Route]:
    return [Route(name="default", model="default", destinations=["tps"])]


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_LOOPBACK = ("127.", "::1", "localhost")


class WebTLS(_Section):
    """HTTPS for the web service; absent means plain HTTP."""

    certificate: ExistingFile = Field(description="server certificate chain (PEM)")
    private_key: ExistingFile = Field(description="private key of the certificate (PEM)")


class Web(_Section):
    """The web service ``vcemri serve`` runs when this section is present: the dashboard
    (studies, jobs, review images, deliveries, retry/cancel/force, the audit log), the JSON
    API under /api/, /healthz and Prometheus /metrics."""

    bind_address: Host = Field(
        "127.0.0.1", description="address to listen on; anything but loopback needs tokens"
    )
    port: TcpPort = Field(8104, description="TCP port to listen on")
    tokens: dict[str, str] = Field(
        default_factory=dict,
        description="user name -> SHA-256 (hex) of that user's access token; required off "
        "loopback. Every request but /healthz and /metrics then needs the token (a bearer "
        "header, or the dashboard's sign-in); actions are audited with the user's name",
    )
    tls: WebTLS | None = Field(None, description="HTTPS settings; null for plain HTTP")

    @model_validator(mode="after")
    def _off_loopback_needs_tokens(self) -> Web:
        bad = [name for name, digest in self.tokens.items() if not _SHA256_HEX.match(digest)]
        if bad:
            raise PydanticCustomError(
                "tokens", "tokens of {names}: give the SHA-256 of the token as 64 lower-case "
                "hex digits (printf %s TOKEN | sha256sum), never the token itself",
                {"names": ", ".join(bad)})
        if not self.tokens and not self.bind_address.startswith(_LOOPBACK):
            raise PydanticCustomError(
                "tokens", "web.bind_address {address} is not loopback: set web.tokens so that "
                "only your users can see and act on jobs", {"address": self.bind_address})
        return self


class Settings(BaseSettings):
    """The whole configuration; ``config/default.yaml`` spells out these defaults.

    A ``BaseSettings`` for its environment conventions (``model_config``), which
    :func:`config.load_settings` applies; constructing ``Settings`` directly ignores the
    environment.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    dicom: DicomNode = Field(default_factory=DicomNode, description="the node's DICOM service")
    storage: Storage = Field(default_factory=Storage, description="where data lives")
    assembly: Assembly = Field(
        default_factory=Assembly, description="series completion and study timeout"
    )
    jobs: Jobs = Field(default_factory=Jobs, description="job queue, retries and sending")
    series_rules: SeriesRules = Field(
        default_factory=SeriesRules,
        description="series recognition; a rule you write replaces that default rule whole",
    )
    routes: list[Route] = Field(
        default_factory=_default_routes, description="routing rules, first match wins"
    )
    destinations: dict[str, Destination] = Field(
        default_factory=lambda: {"tps": Destination(ae_title="TPS", host="127.0.0.1", port=11113)},
        description="DICOM peers that receive results, by name",
    )
    models: dict[str, ModelChoice] = Field(
        default_factory=lambda: {"default": ModelChoice()}, description="synthesis models by name"
    )
    planning: PlanningSettings = Field(
        default_factory=PlanningSettings, description="objects written for the TPS"
    )
    logging: LoggingSettings = Field(
        default_factory=LoggingSettings, description="console logging"
    )
    web: Web | None = Field(
        None, description="web dashboard, JSON API, /healthz and /metrics; null: none"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the arguments: config.load_settings applies the environment itself, key by key
        # over the file's effective settings, so that Settings() is always the plain defaults.
        return (init_settings,)

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        problems = []
        seen: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in seen:
                problems.append(f"routes[{i}].name: {route.name!r} is used by an earlier route")
            seen.add(route.name)
            if route.model not in self.models:
                problems.append(
                    f"routes[{i}].model: {route.model!r} is not a model "
                    f"(defined: {', '.join(sorted(self.models)) or 'none'})"
                )
            for j, name in enumerate(route.destinations):
                if name not in self.destinations:
                    problems.append(
                        f"routes[{i}].destinations[{j}]: {name!r} is not a destination "
                        f"(defined: {', '.join(sorted(self.destinations)) or 'none'})"
                    )
        if problems:
            raise PydanticCustomError(
                "references", "{summary}", {"summary": "; ".join(problems), "problems": problems}
            )
        return self
