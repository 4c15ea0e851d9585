"""Every setting of the gatekeeper, read once at the edge and passed down.

This is the only module that reads the environment. Names, defaults and meanings follow the
SPEC's settings table; anything added beyond it is marked "extra" in its description.
"""

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from gatekeeper.policy.classify import OomMatcher

__all__ = [
    "DEFAULT_GATED_PATHS",
    "ENV_PREFIX",
    "LIVE_SETTINGS",
    "QUEUE_PER_SLOT",
    "Settings",
    "SettingsError",
    "load_settings",
    "server_name",
    "validate_settings",
]

ENV_PREFIX = "ASR_"
QUEUE_PER_SLOT = 10
"""The seed's queue size: 10 waiting tasks per slot (ASR_MAX_QUEUE's default, and the adaptive
mode's queue that follows its limit)."""
DEFAULT_GATED_PATHS = ("/asr", "/detect-language", "/v1/audio/", "/inference")


_LIVE: dict[str, Any] = {"live": True}
"""Marks a setting that may change while serving (PATCH /admin/config, SIGHUP); the rest is
wired into long-lived objects (where we listen, the upstream, tokens, paths, spooling, logging)
and needs a restart."""


def _split_list(value: object) -> object:
    """Split "a,b" or one item a line; a value holding a newline is split on newlines only.

    That lets an OOM pattern contain a comma (`{1,3}`) when the operator writes one pattern a line.
    """
    if isinstance(value, str):
        sep = "\n" if "\n" in value else ","
        return [item.strip() for item in value.split(sep) if item.strip()]
    return value


class Settings(BaseSettings):
    """The gatekeeper's configuration (environment variables with the `ASR_` prefix)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        validate_default=True,
        # inf, nan and 1e999 are no number of seconds: `ASR_RETRY_DELAY=inf` or a PATCH with
        # Infinity would start or be accepted, then break the stats JSON and every schedule.
        allow_inf_nan=False,
    )

    upstream_url: str = Field(
        description="Base URL of the Whisper server, e.g. http://whisper:9000 (required). "
        "Several servers (one per GPU, one queue for all): comma-separated URLs, e.g. "
        "http://gpu0:9000,http://gpu1:9000."
    )
    host: str = Field("0.0.0.0", min_length=1, description="Address the gatekeeper listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gatekeeper listens on.")
    max_concurrent: Annotated[int | tuple[int, ...], NoDecode] = Field(
        1,
        description="Tasks sent to the Whisper server at once (1 to 1024). With several "
        "servers: one value for each, or a comma list with one value per server in "
        "ASR_UPSTREAM_URL's order, e.g. 3,2,1.",
        json_schema_extra=_LIVE,
    )
    adaptive: bool = Field(
        False,
        description="Extra: let the gatekeeper tune its own limit between ASR_MIN_CONCURRENT "
        "and ASR_MAX_CONCURRENT, lowering it on OOM and raising it after stable stretches.",
        json_schema_extra=_LIVE,
    )
    min_concurrent: int = Field(
        1,
        ge=1,
        le=1024,
        description="Extra: lowest limit the adaptive mode may choose.",
        json_schema_extra=_LIVE,
    )
    initial_concurrent: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Extra: limit the adaptive mode starts from (default: ASR_MIN_CONCURRENT, "
        "the seed's conservative start).",
        json_schema_extra=_LIVE,
    )
    adaptive_stable_successes: int = Field(
        3,
        ge=1,
        description="Extra: successes at the full limit, with tasks waiting, before the "
        "adaptive mode tries one more.",
        json_schema_extra=_LIVE,
    )
    adaptive_stable_seconds: float = Field(
        30.0,
        ge=0,
        description="Extra: least seconds at a limit before the adaptive mode raises it.",
        json_schema_extra=_LIVE,
    )
    adaptive_fade_seconds: float = Field(
        3600.0,
        gt=0,
        description="Extra: seconds the adaptive mode remembers OOMs; a ceiling learned from "
        "them goes once they are older (so a fixed or restarted Whisper server is probed again).",
        json_schema_extra=_LIVE,
    )
    gpu_memory_gib: Annotated[float | tuple[float, ...] | None, NoDecode] = Field(
        None,
        description="GPU memory in GiB available to tasks on a card (the seed's total − "
        "reserved: 24 − 6 = 18 on an RTX 3090). Setting it turns on admission by memory: a task "
        "starts on a card only when its estimated peak fits beside the card's running tasks "
        "(ASR_MAX_CONCURRENT still caps the count). One value for all servers or one per server.",
        json_schema_extra=_LIVE,
    )
    task_memory_gib: Annotated[float | tuple[float, ...], NoDecode] = Field(
        6.0,
        description="A task's peak GPU memory in GiB whatever its length (the seed's "
        "单个转录峰值); with ASR_ADAPTIVE, where learning starts. One value or one per server.",
        json_schema_extra=_LIVE,
    )
    task_memory_per_minute_gib: Annotated[float | tuple[float, ...], NoDecode] = Field(
        0.0,
        description="Extra peak GPU memory in GiB per minute of audio. One value or one per "
        "server.",
        json_schema_extra=_LIVE,
    )
    backfill_seconds: float = Field(
        120.0,
        ge=0,
        description="Extra (admission by memory): a task that fits may start before an earlier "
        "one that does not, but the head of the queue is passed for at most this many seconds; "
        "then it is served next. 0: strict first-in first-out.",
        json_schema_extra=_LIVE,
    )
    timeout_per_audio_minute: float | None = Field(
        None,
        gt=0,
        description="Extra: scale an attempt's timeout with its audio: this many seconds per "
        "minute of audio, at least 60, at most ASR_REQUEST_TIMEOUT (which stays the worst case "
        "and applies to files of unknown length). 30 gives the seed's table: 1 min → 60 s, "
        "5 min → 150 s, 10 min → 300 s. Unset: every attempt gets ASR_REQUEST_TIMEOUT.",
        json_schema_extra=_LIVE,
    )
    max_queue: int | None = Field(
        None,
        ge=0,
        description="Tasks allowed to wait; beyond it, refuse. Default 10 × concurrent (in the "
        "adaptive mode: 10 × the current limit, following it as it moves).",
        json_schema_extra=_LIVE,
    )
    queue_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds a task may wait in the queue before it is refused.",
        json_schema_extra=_LIVE,
    )
    max_retries: int = Field(
        3,
        ge=0,
        le=100,
        description="Retries after the first attempt (0 = never retry).",
        json_schema_extra=_LIVE,
    )
    retry_delay: float = Field(
        10.0,
        ge=0,
        description="Base retry delay in seconds; every schedule derives from it.",
        json_schema_extra=_LIVE,
    )
    retry_jitter: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Each delay is multiplied by uniform(1-j, 1+j).",
        json_schema_extra=_LIVE,
    )
    retry_on_timeout: bool = Field(
        False,
        description="Extra: retry an attempt that hit ASR_REQUEST_TIMEOUT (off: the GPU may "
        "still be working on it, a retry would double its load).",
        json_schema_extra=_LIVE,
    )
    request_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds one upstream attempt may take, sending the spooled body included.",
        json_schema_extra=_LIVE,
    )
    timeout_hold: float | None = Field(
        None,
        gt=0,
        description="Extra: after an attempt times out (504 at ASR_REQUEST_TIMEOUT), seconds its "
        "slot stays taken while the Whisper server may still be computing it: until the server "
        "answers (read and dropped) or closes the connection, at most this long. Default: "
        "ASR_REQUEST_TIMEOUT.",
        json_schema_extra=_LIVE,
    )
    oom_window: float | None = Field(
        None,
        ge=0,
        description="Seconds after an OOM during which new tasks cool down first.",
        json_schema_extra=_LIVE,
    )
    oom_cooldown: float | None = Field(
        None,
        ge=0,
        description="Seconds a task waits before starting inside the OOM window. Default "
        "1.5 × delay; 0 in the adaptive mode, where the limit cut after an OOM does its job.",
        json_schema_extra=_LIVE,
    )
    gated_paths: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_GATED_PATHS,
        description="Path prefixes that are tasks (queued, limited, retried).",
    )
    task_methods: Annotated[tuple[str, ...], NoDecode] = Field(
        ("POST",),
        description="Extra: HTTP methods that carry work on the task paths; other methods "
        "(OPTIONS preflights, HEAD, GET) on those paths pass straight through.",
    )
    oom_patterns: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Extra regular expressions that mark an upstream error body as OOM."
    )
    max_body_size: int = Field(
        1_073_741_824, ge=1, description="Largest request body accepted, in bytes (413 beyond)."
    )
    client_body_timeout: float = Field(
        60.0,
        gt=0,
        description="Extra: seconds a client may pause while sending its body before it gets "
        "408 and its place is freed (like nginx's client_body_timeout).",
        json_schema_extra=_LIVE,
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Extra: seconds a client may take to send a request's line and headers, "
        "from when it connects or starts the next request on a kept-alive connection; then "
        "it gets 408 and the connection closes (like nginx's client_header_timeout). Idle "
        "kept-alive connections are not affected.",
    )
    upload_timeout: float = Field(
        600.0,
        gt=0,
        description="Extra: seconds a task's whole upload may take. An upload is received in "
        "full before its task queues: it holds no slot, only a place (a task arrives only while "
        "running + queued + uploading tasks < ASR_MAX_CONCURRENT + ASR_MAX_QUEUE); past this "
        "the client gets 408. ASR_QUEUE_TIMEOUT counts from the end of the upload.",
        json_schema_extra=_LIVE,
    )
    spool_memory_size: int = Field(
        1_048_576,
        ge=0,
        description="Extra: request bodies up to this many bytes are kept in memory; larger "
        "ones are spooled to a temporary file.",
    )
    spool_dir: Path | None = Field(
        None, description="Extra: directory for spooled request bodies (default: system temp)."
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="Extra: seconds running and queued tasks get to finish after SIGTERM.",
    )
    health_interval: float = Field(
        5.0, gt=0, description="Extra: seconds between background checks of the Whisper server."
    )
    health_path: str | None = Field(
        None,
        description="Extra: also GET this path of the Whisper server in health checks (e.g. "
        "/health); by default only a TCP connection is opened.",
    )
    health_timeout: float = Field(
        2.0, gt=0, description="Extra: seconds one health check may take."
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Replicas: the Redis every gatekeeper of a cluster shares each Whisper "
        "server's limit through (e.g. redis://redis:6379/0); unset: no coordination, this "
        "gatekeeper alone keeps the limits.",
    )
    cluster: str = Field(
        "asr-gatekeeper",
        min_length=1,
        pattern=r"^[^{}]+$",
        description="Replicas: the cluster's name; gatekeepers with the same ASR_REDIS_URL and "
        "ASR_CLUSTER share limits (no braces).",
    )
    redis_lease: float = Field(
        15.0,
        ge=1.0,
        description="Replicas: seconds a slot's lease lives unrenewed: a replica that dies or "
        "is stopped frees its slots after this long, and no sooner (the GPU may still be on its "
        "tasks). Renewed every third of it.",
    )
    redis_timeout: float = Field(
        0.5,
        gt=0,
        description="Extra: seconds one Redis call may take before the replica counts Redis as "
        "unreachable (and refuses what it cannot prove); under a third of ASR_REDIS_LEASE.",
    )
    stats_token: SecretStr | None = Field(
        None, description="When set, /stats needs 'Authorization: Bearer <token>'."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Extra: when set, GET/PATCH /admin/config (with 'Authorization: Bearer "
        "<token>') changes limits and retry settings live; unset, /admin/config answers 404.",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level logged."
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="Extra: the event loop. auto: uvloop when it is installed (a dependency on "
        "Linux: it answers a flood of refusals about a tenth faster), else Python's own; "
        "asyncio: always Python's own, e.g. to rule uvloop out when chasing a problem.",
    )

    @field_validator("upstream_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        urls = [_check_one_url(item) for item in value.split(",") if item.strip()]
        if not urls:
            raise ValueError("name at least one URL, e.g. http://whisper:9000")
        names = [server_name(url) for url in urls]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"lists the same server twice: {', '.join(twice)}")
        return ",".join(urls)

    @field_validator("max_concurrent", mode="before")
    @classmethod
    def _parse_limits(cls, value: object) -> int | tuple[int, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            items = [items]
        limits = tuple(_limit(item) for item in items)
        if not limits:
            raise ValueError("give a whole number from 1 to 1024, or one per server: 3,2,1")
        return limits[0] if len(limits) == 1 else limits

    @field_validator(
        "gpu_memory_gib", "task_memory_gib", "task_memory_per_minute_gib", mode="before"
    )
    @classmethod
    def _parse_gib(cls, value: object, info: ValidationInfo) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            items = [items]
        amounts = tuple(_gib(item) for item in items)
        if info.field_name == "gpu_memory_gib" and min(amounts) <= 0:
            raise ValueError("each card needs more than 0 GiB for tasks, e.g. 18 on a 24 GB card")
        return amounts[0] if len(amounts) == 1 else amounts

    @field_validator("gated_paths", "oom_patterns", "task_methods", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("task_methods")
    @classmethod
    def _check_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(dict.fromkeys(m.upper() for m in value))
        for method in methods:
            if not re.fullmatch(r"[A-Z]+", method):
                raise ValueError(f"each method must be a word like POST, got {method!r}")
        if not methods:
            raise ValueError("name at least one method, e.g. POST")
        return methods

    @field_validator("spool_dir")
    @classmethod
    def _check_spool_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"must be an existing directory, got {str(value)!r}")
        return value

    @field_validator("stats_token", "admin_token", "redis_url", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            url = URL(value.get_secret_value())
            where = url.path if url.scheme == "unix" else url.host
            if url.scheme not in ("redis", "rediss", "unix") or not where:
                raise ValueError(
                    "must be a redis:// (or rediss://, unix://) URL, e.g. redis://redis:6379/0"
                )
        return value

    @field_validator("health_path")
    @classmethod
    def _check_health_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value or None

    @field_validator("gated_paths")
    @classmethod
    def _check_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"each prefix must start with '/', got {path!r}")
        return value

    @field_validator("oom_patterns")
    @classmethod
    def _check_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        OomMatcher.from_patterns(value)  # raises ValueError naming the bad pattern
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        # pydantic reads true as 1: `{"max_concurrent": true}` in a PATCH would set the limit
        # to 1. Text from the environment ("3") is never a bool and still converts.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if {int, float} & set(get_args(annotation) or (annotation,)):
                raise ValueError("must be a number, not true or false")
        return value

    @field_validator("log_format", "event_loop", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _derive_defaults(self) -> Self:
        # Derived defaults (SPEC): queue 10 × concurrency, OOM window 3 × delay,
        # cool-down 1.5 × delay.
        # The adaptive mode (extra) sizes the queue by its current limit and needs no cool-down:
        # the cut after an OOM already holds new starts back while the retried task waits.
        if self.max_queue is None:
            object.__setattr__(self, "max_queue", QUEUE_PER_SLOT * self.start_limit)
        if self.oom_window is None:
            object.__setattr__(self, "oom_window", 3 * self.retry_delay)
        if self.timeout_hold is None:
            object.__setattr__(self, "timeout_hold", self.request_timeout)
        if self.oom_cooldown is None:
            object.__setattr__(
                self, "oom_cooldown", 0.0 if self.adaptive else 1.5 * self.retry_delay
            )
        servers = len(self.upstream_urls)
        per_server = ("max_concurrent", "gpu_memory_gib", "task_memory_gib")
        for name in (*per_server, "task_memory_per_minute_gib"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != servers:
                given = ",".join(f"{v:g}" for v in value)
                raise ValueError(
                    f"{ENV_PREFIX}{name.upper()}={given} has {len(value)} values for "
                    f"{servers} server(s) in ASR_UPSTREAM_URL: give one value for all, or one "
                    "per server in the same order"
                )
        if not self.redis_timeout < self.redis_lease / 3:
            raise ValueError(
                f"ASR_REDIS_TIMEOUT={self.redis_timeout:g} must be under a third of "
                f"ASR_REDIS_LEASE={self.redis_lease:g} (the renewal interval), or a slow Redis "
                "would lose leases that are still renewed"
            )
        if self.adaptive:
            start = self.initial_concurrent or self.min_concurrent
            if not self.min_concurrent <= start <= max(self.limits):
                raise ValueError(
                    "ASR_MIN_CONCURRENT ≤ ASR_INITIAL_CONCURRENT ≤ ASR_MAX_CONCURRENT must hold "
                    f"(got {self.min_concurrent} ≤ {start} ≤ {max(self.limits)})"
                )
            if self.min_concurrent > min(self.limits):
                raise ValueError(
                    f"ASR_MIN_CONCURRENT={self.min_concurrent} is above a server's "
                    f"ASR_MAX_CONCURRENT ({min(self.limits)}): each server's limit must allow it"
                )
        return self

    # Typed views of the derived values (never None after validation).
    @property
    def queue_limit(self) -> int:
        assert self.max_queue is not None
        return self.max_queue

    @property
    def oom_window_s(self) -> float:
        assert self.oom_window is not None
        return self.oom_window

    @property
    def oom_cooldown_s(self) -> float:
        assert self.oom_cooldown is not None
        return self.oom_cooldown

    @property
    def timeout_hold_s(self) -> float:
        assert self.timeout_hold is not None
        return self.timeout_hold

    def oom_matcher(self) -> OomMatcher:
        """The built-in OOM patterns plus the operator's."""
        return OomMatcher.from_patterns(self.oom_patterns)

    @property
    def queue_follows_limit(self) -> bool:
        """Adaptive mode (by count) without ASR_MAX_QUEUE: the queue is 10 × the current
        limit."""
        return self.adaptive and not self.by_memory and "max_queue" not in self.model_fields_set

    @property
    def upstream_urls(self) -> tuple[str, ...]:
        """The Whisper servers, one per GPU, in the order given."""
        return tuple(self.upstream_url.split(","))

    @property
    def upstream_names(self) -> tuple[str, ...]:
        """Each server's name in stats, metrics and logs: its host:port."""
        return tuple(server_name(url) for url in self.upstream_urls)

    @property
    def limits(self) -> tuple[int, ...]:
        """ASR_MAX_CONCURRENT for each server, in ASR_UPSTREAM_URL's order."""
        if isinstance(self.max_concurrent, int):
            return (self.max_concurrent,) * len(self.upstream_urls)
        return self.max_concurrent

    def _per_server(self, value: float | tuple[float, ...]) -> tuple[float, ...]:
        return (value,) * len(self.upstream_urls) if isinstance(value, float) else value

    @property
    def memory_budgets(self) -> tuple[float | None, ...]:
        """ASR_GPU_MEMORY_GIB for each server; None: admission by count only."""
        if self.gpu_memory_gib is None:
            return (None,) * len(self.upstream_urls)
        return self._per_server(self.gpu_memory_gib)

    @property
    def task_memory(self) -> tuple[tuple[float, float], ...]:
        """(ASR_TASK_MEMORY_GIB, ASR_TASK_MEMORY_PER_MINUTE_GIB) for each server."""
        return tuple(
            zip(
                self._per_server(self.task_memory_gib),
                self._per_server(self.task_memory_per_minute_gib),
                strict=True,
            )
        )

    @property
    def by_memory(self) -> bool:
        """Admission by GPU memory (ASR_GPU_MEMORY_GIB is set)."""
        return self.gpu_memory_gib is not None

    @property
    def total_limit(self) -> int:
        """The servers' limits together: tasks upstream at once, at most."""
        return sum(self.limits)

    @property
    def start_limits(self) -> tuple[int, ...]:
        """Each server's limit to start with: fixed, or the adaptive mode's starting point (by
        memory the count only caps: the memory figures are what adapts)."""
        if not self.adaptive or self.by_memory:
            return self.limits
        start = self.initial_concurrent or self.min_concurrent
        return tuple(min(start, limit) for limit in self.limits)

    @property
    def start_limit(self) -> int:
        """The servers' starting limits together (the default queue is 10 × this)."""
        return sum(self.start_limits)

    def public_dict(self) -> dict[str, Any]:
        """The effective settings as an operator may see them: secrets are never included."""
        data = self.model_dump(mode="json", exclude={"stats_token", "admin_token"})
        data["max_queue"] = self.queue_limit
        data["oom_window"] = self.oom_window_s
        data["oom_cooldown"] = self.oom_cooldown_s
        data["timeout_hold"] = self.timeout_hold_s
        data["stats_token_set"] = self.stats_token is not None
        data["admin_token_set"] = self.admin_token is not None
        return data


def _check_one_url(value: str) -> str:
    url = URL(value.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://whisper:9000")
    if url.query_string or url.fragment:
        raise ValueError("must not carry a query string or fragment")
    return str(url).rstrip("/")


def _limit(value: object) -> int:
    """One server's ASR_MAX_CONCURRENT: a whole number from 1 to 1024."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if type(text) is not int or not 1 <= text <= 1024:
        raise ValueError(f"each limit must be a whole number from 1 to 1024, got {value!r}")
    return text


def _gib(value: object) -> float:
    """One server's amount of GPU memory in GiB: a finite number ≥ 0."""
    text = value.strip() if isinstance(value, str) else value
    try:
        amount = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        amount = math.nan
    if isinstance(value, bool) or not math.isfinite(amount) or amount < 0:
        raise ValueError(f"each amount must be a finite number of GiB ≥ 0, got {value!r}")
    return amount


def server_name(url: str) -> str:
    """A Whisper server's name in stats, metrics and logs: `host:port` of its URL."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"


LIVE_SETTINGS = frozenset(
    name
    for name, info in Settings.model_fields.items()
    if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("live")
)
"""The settings that may change without a restart."""


class SettingsError(Exception):
    """Bad configuration; `lines` holds one operator-facing sentence per bad setting."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _describe(field: str, flags: dict[str, str]) -> str:
    name = ENV_PREFIX + field.upper()
    flag = flags.get(field)
    return f"{name} (--{flag})" if flag else name


def _message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "is invalid"))
    msg = re.sub(r"^Value error, ", "", msg)
    if error.get("type") == "missing":
        return "is required"
    # "Input should be…" reads better mid-sentence as "input should be…"; names stay as they are.
    return msg[0].lower() + msg[1:] if msg[1:2].islower() else msg


def _problems(exc: ValidationError, flags: dict[str, str]) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = error.get("loc") or ()
        field = str(loc[0]) if loc else ""
        if field not in Settings.model_fields:  # a rule across several settings
            lines.append(f"settings are inconsistent: {_message(dict(error))}")
            continue
        given = error.get("input")
        shown = "" if error.get("type") == "missing" or isinstance(given, dict) else f"={given}"
        if field == "upstream_url" and error.get("type") == "missing":
            lines.append(
                f"{_describe(field, flags)} is required: set it to the Whisper server's "
                "base URL, e.g. ASR_UPSTREAM_URL=http://whisper:9000"
            )
            continue
        if field in ("stats_token", "admin_token"):
            shown = ""
        elif field == "redis_url" and isinstance(given, str):
            shown = f"={_mask_password(given)}"
        lines.append(f"{_describe(field, flags)}{shown} is invalid: {_message(dict(error))}")
    return lines


def _mask_password(url: str) -> str:
    """A URL as it may be shown: its password (user part, or `password=` query) as ***."""
    masked = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", masked)


def validate_settings(data: dict[str, Any]) -> Settings:
    """Settings from plain values only (no environment, no file): for live changes."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_problems(exc, {})) from None


def load_settings(
    overrides: dict[str, Any] | None = None,
    *,
    env_file: str | Path | None = ".env",
    flags: dict[str, str] | None = None,
) -> Settings:
    """Build the settings from flags (`overrides`), the environment and the env file.

    Raises SettingsError with one line per bad setting, naming the variable and the rule.
    """
    flags = flags or {}
    kwargs = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Settings(_env_file=env_file, **kwargs)
    except ValidationError as exc:
        raise SettingsError(_problems(exc, flags)) from None
