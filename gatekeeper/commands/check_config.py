"""`gatekeeper check-config`: the worst case of one task, and whether the proxy waits that long.

It loads the settings exactly as `gatekeeper serve` does (same flags, environment, env file),
prints the Whisper servers with their limits, the total and the queue (one queue for all
servers; notes on a pool that may surprise; with ASR_REDIS_URL, the cluster the replicas share
and its lease), then the worst case of one task part by part
(`budget.TaskBudget`; the same for one server or several), and compares it with a
proxy timeout given as `--proxy-timeout` or read from an nginx config (`--nginx-conf`: the
`proxy_read_timeout` and `proxy_send_timeout` in force in each location that proxies to the
gatekeeper, and its `client_max_body_size`, which must not be below ASR_MAX_BODY_SIZE).
Exit status: 0 fine, 1 the proxy would give up first (or refuse smaller uploads than the
gatekeeper), 2 bad settings or input.
"""

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from gatekeeper.commands.flags import (
    add_settings_arguments,
    print_error,
    print_settings_error,
    settings_loader,
)
from gatekeeper.commands.nginx_conf import (
    ProxiedLocation,
    format_nginx_size,
    nginx_proxied_locations,
    parse_nginx_time,
)
from gatekeeper.config import MIN_ATTEMPT_TIMEOUT, ProxyConfig
from gatekeeper.policy.budget import RETRY_AFTER_CAP, TaskBudget, from_settings
from gatekeeper.policy.memory import UNKNOWN_AUDIO_SECONDS, MemoryModel
from gatekeeper.settings import QUEUE_PER_SLOT, Settings, SettingsError

__all__ = [
    "add_check_config_arguments",
    "describe_budget",
    "describe_cluster",
    "describe_memory",
    "describe_servers",
    "describe_timeouts",
    "main",
    "masked_url",
    "pool_notes",
    "run_check_config",
    "suggested_timeout",
]

_MARGIN: Final = 1.1  # suggested proxy timeouts: the worst case plus 10 %

_PROG: Final = "gatekeeper check-config"

_UNEVEN: Final = 2
"""Limits this many times apart or more get a note (fine for cards of different memory)."""

# The gatekeeper answers these itself at once; locations for them alone carry no tasks.
_OWN_ENDPOINTS: Final = ("/stats", "/api/recordings/stats/asr-concurrency", "/metrics", "/health")


def _num(seconds: float) -> str:
    text = f"{seconds:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _human(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if minutes or hours:
        parts.append(f"{minutes} min")
    parts.append(f"{secs} s")
    return " ".join(parts)


def suggested_timeout(worst_case: float) -> int:
    """A proxy timeout with room to spare: the worst case + 10 %, rounded up (to 100 s)."""
    wanted = worst_case * _MARGIN
    step = 100 if wanted >= 1000 else 1
    return int(math.ceil(wanted / step) * step)


def _delays(delays: tuple[float, ...]) -> str:
    return " + ".join(_num(d) for d in delays) + " s" if delays else "none"


# -- the worst case in words ---------------------------------------------------------------------


def _budget_rows(budget: TaskBudget, settings: Settings) -> list[tuple[str, float]]:
    """(what, seconds) for each part of the worst case that applies."""
    retries = len(budget.retry_delays)
    rows = [
        ("waiting for a slot after the upload (ASR_QUEUE_TIMEOUT)", budget.queue_timeout),
        ("OOM cool-down before the first attempt (ASR_OOM_COOLDOWN)", budget.oom_cooldown),
        (
            f"{budget.attempts} attempt(s) × {_num(budget.request_timeout)} s "
            f"(1 + ASR_MAX_RETRIES={settings.max_retries}, ASR_REQUEST_TIMEOUT)",
            budget.attempts_seconds,
        ),
        (
            f"{retries} retry delay(s) at their longest ({_delays(budget.retry_delays)})",
            budget.retry_delay_seconds,
        ),
        (
            f"{retries} wait(s) for a slot to retry in (no cool-down: the slot is given away "
            "during a delay; at most ASR_REQUEST_TIMEOUT each)",
            budget.retry_slot_wait_seconds,
        ),
        (
            f"{retries} wait(s) for the Whisper server to finish a timed-out attempt before its "
            "retry (ASR_RETRY_ON_TIMEOUT, ASR_TIMEOUT_HOLD)",
            budget.retry_hold_seconds,
        ),
    ]
    # The last two are waits only some settings have: shown only when they add time.
    return rows[:4] + [(label, seconds) for label, seconds in rows[4:] if seconds]


def describe_budget(budget: TaskBudget, settings: Settings) -> list[str]:
    """The worst case in operator words, one line per part."""
    rows = _budget_rows(budget, settings)
    width = max(len(label) for label, _ in rows)
    with_retry_after = "= with Retry-After (each delay up to " + _num(RETRY_AFTER_CAP) + " s)"
    return [
        "Worst case for one task with these settings, from its arrival at the gatekeeper to "
        "the first byte of its answer:",
        *(f"  {label:<{width}}  {_num(value):>7} s" for label, value in rows),
        f"  {'= without Retry-After from the Whisper server':<{width}}  "
        f"{_num(budget.worst_case):>7} s  ({_human(budget.worst_case)})",
        f"  {with_retry_after:<{width}}  "
        f"{_num(budget.worst_case_with_retry_after):>7} s  "
        f"({_human(budget.worst_case_with_retry_after)}; delays "
        f"{_delays(budget.retry_delays_with_retry_after)})",
        "Retry delays follow the OOM/crash schedule ASR_RETRY_DELAY × 3^(k−1) with jitter at its "
        f"top (×{1 + settings.retry_jitter:g}), the longest of all schedules.",
    ]


# -- the servers, the total and the queue ---------------------------------------------------------


def describe_servers(settings: Settings) -> list[str]:
    """Each Whisper server with its limit, then the total and the queue, in operator words."""
    names, urls = settings.upstream_names, settings.upstream_urls
    several = len(urls) > 1
    lines = [
        f"{len(urls)} Whisper servers (ASR_UPSTREAM_URL; one queue for all, a task goes to the "
        "server with the most room):"
        if several
        else "Whisper server (ASR_UPSTREAM_URL):"
    ]
    name_width, url_width = max(map(len, names)), max(map(len, urls))
    for name, url, limit, start in zip(
        names, urls, settings.limits, settings.start_limits, strict=True
    ):
        lines.append(
            f"  {name:<{name_width}}  {url:<{url_width}}  {_limit_words(settings, limit, start)}"
        )
    if several:
        lines.append(f"  total: {_total_words(settings)}")
    return [*lines, *_queue_lines(settings)]


def _limit_words(settings: Settings, limit: int, start: int) -> str:
    if settings.by_memory:
        return f"at most {limit} at a time, as its memory allows (below)"
    if not settings.adaptive:
        return f"{limit} at a time"
    return f"{settings.min_concurrent} to {limit} at a time (adaptive; starts at {start})"


def _total_words(settings: Settings) -> str:
    if not settings.adaptive or settings.start_limit == settings.total_limit:
        return f"{settings.total_limit} at a time (the sum of the limits)"
    return (
        f"{settings.start_limit} at a time at the start, at most {settings.total_limit} (the "
        "sum of the limits)"
    )


def _queue_lines(settings: Settings) -> list[str]:
    """The queue's size and where it comes from, then how long its last place waits."""
    slots = "the sum of the limits" if len(settings.upstream_urls) > 1 else "the limit"
    if settings.queue_follows_limit:
        size = (
            f"{QUEUE_PER_SLOT} × {slots} in force (ASR_MAX_QUEUE unset, adaptive): "
            f"{settings.queue_limit} at the start, at most {QUEUE_PER_SLOT * settings.total_limit}"
        )
        full = QUEUE_PER_SLOT * settings.total_limit
    elif "max_queue" in settings.model_fields_set:
        default = QUEUE_PER_SLOT * settings.start_limit
        size = f"{settings.queue_limit} places (ASR_MAX_QUEUE; the default would be {default})"
        full = settings.queue_limit
    else:
        size = (
            f"{settings.queue_limit} places (ASR_MAX_QUEUE unset: {QUEUE_PER_SLOT} × "
            f"{settings.start_limit}, {slots})"
        )
        full = settings.queue_limit
    return [f"  queue: {size}", *_queue_wait_lines(settings, full)]


def _queue_wait_lines(settings: Settings, queue: int) -> list[str]:
    """The last of a full queue starts after ⌈queue / total⌉ tasks per slot have ended: within
    ASR_QUEUE_TIMEOUT only when tasks take at most that share of it, on average."""
    if queue == 0:
        return ["  no task waits: one that finds every slot taken is refused at once"]
    rounds = math.ceil(queue / settings.total_limit)
    per_task = settings.queue_timeout / rounds
    return [
        f"  the last of a full queue waits for about {rounds} task(s) per slot "
        f"({queue} ÷ {settings.total_limit}): it starts within ASR_QUEUE_TIMEOUT="
        f"{_num(settings.queue_timeout)} s only if tasks average {_num(per_task)} s or less, "
        "else the back of a full queue is refused (queue_timeout)"
    ]


def pool_notes(settings: Settings) -> list[str]:
    """What an operator of several servers may want to know; none stops the gatekeeper."""
    if len(settings.upstream_urls) < 2:
        return []
    return [
        f"NOTE: {note}"
        for note in (_uneven_limits(settings), _shared_hosts(settings), _no_retry(settings))
        if note
    ]


def _uneven_limits(settings: Settings) -> str | None:
    limits, names = settings.limits, settings.upstream_names
    low, high = min(limits), max(limits)
    if high < _UNEVEN * low:
        return None
    big = ", ".join(n for n, limit in zip(names, limits, strict=True) if limit == high)
    small = ", ".join(n for n, limit in zip(names, limits, strict=True) if limit == low)
    return (
        f"{big} may run {high} tasks at once, {small} only {low}: fine for cards of different "
        "memory (new tasks go where there is most room, so the larger card takes more); make "
        "each limit that card's own (`gatekeeper tune URL,URL,…` measures each card in turn)"
    )


def _shared_hosts(settings: Settings) -> str | None:
    hosts: dict[str, list[str]] = {}
    for name in settings.upstream_names:
        hosts.setdefault(name.rsplit(":", 1)[0], []).append(name)
    shared = [names for names in hosts.values() if len(names) > 1]
    if not shared:
        return None
    listed = "; ".join(", ".join(names) for names in shared)
    return (
        f"{listed} run on one host: fine when each server has a GPU of its own; servers on one "
        "GPU share its memory, and their limits together must fit it"
    )


def _no_retry(settings: Settings) -> str | None:
    if settings.max_retries > 0:
        return None
    return (
        "ASR_MAX_RETRIES=0: a task whose server fails (a crash, an OOM) is never retried, "
        "on that server or another"
    )


def _pool_budget_lines(settings: Settings) -> list[str]:
    """Why the worst case of one task does not grow with the number of servers."""
    if len(settings.upstream_urls) < 2:
        return []
    if settings.oom_cooldown_s > 0:
        retry = (
            "with a cool-down it keeps its slot through the delay and then moves only to a "
            "slot that is free at once, else stays where it was"
        )
    else:
        retry = (
            "without a cool-down it takes the first slot free on any server, waiting at most "
            "ASR_REQUEST_TIMEOUT as above"
        )
    return [
        f"With {len(settings.upstream_urls)} servers the worst case is the same: the settings "
        f"apply to each alike; a retry may run on another server, but {retry}; the cool-down "
        "is each server's own (an OOM on one card delays only tasks starting on it) and comes "
        "at most once, before the first attempt."
    ]


# -- replicas sharing the limits through Redis ----------------------------------------------------

_SHORT_LEASE: Final = 3.0
"""A lease shorter than this is lost to a stall an event loop or a GC pause can take."""
_LONG_LEASE: Final = 60.0
"""A lease longer than this (or than ASR_REQUEST_TIMEOUT) outlives many whole tasks."""
_RENEWALS_PER_LEASE: Final = 3
"""A replica renews its leases every third of ASR_REDIS_LEASE (gatekeeper/cluster/leases.py)."""
_MASK: Final = "***"
_QUERY_PASSWORD: Final = re.compile(r"((?:^|&)password=)[^&]*")


def masked_url(url: str) -> str:
    """`url` with its password, in the user part or as a `password=` query, shown as ***."""
    parts, masked = urlsplit(url), url
    if parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        masked = masked.replace(parts.netloc, f"{user.partition(':')[0]}:{_MASK}@{host}", 1)
    if parts.query:
        query = _QUERY_PASSWORD.sub(rf"\g<1>{_MASK}", parts.query)
        masked = masked.replace(f"?{parts.query}", f"?{query}", 1)
    return masked


def describe_cluster(settings: Settings) -> tuple[list[str], list[str]]:
    """With ASR_REDIS_URL: the cluster the replicas share, the lease and what it means, then the
    warnings (a lease a stall can lose, or one that keeps a dead replica's slots too long).
    Nothing without it."""
    if settings.redis_url is None:
        return [], []
    url = settings.redis_url.get_secret_value()
    lease, timeout = settings.redis_lease, settings.redis_timeout
    renewal = lease / _RENEWALS_PER_LEASE
    lines = [
        "Replicas (ASR_REDIS_URL): every gatekeeper with this Redis and this cluster name shares "
        "each Whisper server's slots; the limits above hold at the server for all of them "
        "together:",
        f"  cluster: {settings.cluster} (ASR_CLUSTER)",
        f"  Redis: {masked_url(url)}",
        f"  lease: {_num(lease)} s (ASR_REDIS_LEASE), renewed every {round(renewal, 2):g} s; "
        f"a Redis call slower than {_num(timeout)} s counts as Redis unreachable "
        "(ASR_REDIS_TIMEOUT)",
        f"  a replica that dies frees its slots within {_num(lease)} s: one lease after it last "
        "renewed them, never sooner (the GPU may still be on its tasks); a replica stalled "
        f"longer than {_num(lease)} s loses its leases",
        "  the queue above is each replica's own (ASR_MAX_QUEUE counts per replica): two "
        "replicas queue twice as many tasks",
        "  while Redis cannot be reached: no new task starts, tasks wait in the queue, arrivals "
        "beyond it are refused 503 coordination_unavailable, /health says degraded; it recovers "
        "by itself",
        "  give every replica the same ASR_UPSTREAM_URL (a server is known by its host:port) and "
        "the same limits and ASR_REDIS_LEASE: the same .env",
    ]
    lines.append("  shared as well: " + ", ".join(_shared_besides_slots(settings)))
    warnings = [
        f"WARNING: {warning}"
        for warning in (_short_lease(settings), _long_lease(settings))
        if warning
    ]
    return lines, warnings


def _shared_besides_slots(settings: Settings) -> list[str]:
    """What the replicas share besides the count (gatekeeper/cluster/sharing.py)."""
    shared = ["each card's last OOM (an OOM on a card starts every replica's cool-down there)"]
    if settings.adaptive:
        shared.append("its adaptive limit (the last change wins)")
    if settings.by_memory:
        shared.append("its memory budget (a lease carries its task's estimate)")
        if settings.adaptive:
            shared.append("its learned memory figures")
    return shared


def _short_lease(settings: Settings) -> str | None:
    lease = settings.redis_lease
    if lease >= _SHORT_LEASE:
        return None
    return (
        f"ASR_REDIS_LEASE={_num(lease)} s: a replica that stalls that long (an event-loop stall, "
        "a GC pause, a busy host or a paused VM) loses its leases, and another replica may start "
        f"tasks on those slots while the GPU still runs them; use {_num(_SHORT_LEASE)} s or more "
        "(the default is 15)"
    )


def _long_lease(settings: Settings) -> str | None:
    lease, request = settings.redis_lease, settings.request_timeout
    if lease <= min(_LONG_LEASE, request):
        return None
    than = (
        f"ASR_REQUEST_TIMEOUT={_num(request)} s, the longest one attempt may run"
        if request < _LONG_LEASE
        else f"{_num(_LONG_LEASE)} s, longer than many whole tasks"
    )
    return (
        f"ASR_REDIS_LEASE={_num(lease)} s is longer than {than}: a replica that dies (killed, "
        f"out of memory, its host lost) keeps its slots taken for {_num(lease)} s, and the card "
        "idles on them; the default 15 s frees them sooner"
    )


# -- admission by memory and timeouts scaled by the audio -----------------------------------------

_SHOWN_MINUTES: Final = (1, 5, 10, 30)
"""Audio lengths whose tasks at once are shown per card."""
_SHORT_MINUTES: Final = 1
"""Files this long count as short: the count cap should not be what holds them back."""
_LONG_MINUTES: Final = 10
"""A file this long that needs more than the whole card gets a warning."""
_TIMEOUT_MINUTES: Final = (1, 5, 10)
"""Audio lengths whose attempt timeout is shown with ASR_TIMEOUT_PER_AUDIO_MINUTE."""


@dataclass(frozen=True, slots=True)
class _Card:
    """One server's memory settings: its budget, its cost model and its count cap."""

    name: str
    budget: float
    model: MemoryModel
    cap: int

    def cost(self, minutes: float) -> float:
        return self.model.cost(minutes * 60.0)

    def by_memory(self, minutes: float) -> int:
        """Tasks of this length that fit in the budget together (at least 1: one runs alone)."""
        cost = self.cost(minutes)
        if cost <= 0:
            return self.cap
        return max(1, math.floor((self.budget + 1e-9) / cost))

    def at_once(self, minutes: float) -> int:
        return min(self.cap, self.by_memory(minutes))


def _gib(value: float) -> str:
    return f"{round(value, 3):g} GiB"


def _cards(settings: Settings) -> list[_Card]:
    return [
        _Card(name, budget, MemoryModel(base, per_minute), cap)
        for name, budget, (base, per_minute), cap in zip(
            settings.upstream_names,
            settings.memory_budgets,
            settings.task_memory,
            settings.limits,
            strict=True,
        )
        if budget is not None
    ]


def describe_memory(settings: Settings) -> tuple[list[str], list[str]]:
    """Admission by memory in operator words: each card's budget and figures and what they mean
    in tasks at once, the backfill bound, the adaptive mode's part; then the warnings (a long
    file bigger than the card). Nothing when admission is by count."""
    if not settings.by_memory:
        return [], []
    cards = _cards(settings)
    lines = [
        "Admission by GPU memory (ASR_GPU_MEMORY_GIB): a task starts on a card only when its "
        "estimated peak fits beside the card's running tasks; ASR_MAX_CONCURRENT still caps "
        "the count:"
    ]
    width = max(len(card.name) for card in cards)
    for card in cards:
        lines += [
            f"  {card.name:<{width}}  {_gib(card.budget)} for tasks; a task "
            f"{_gib(card.model.base_gib)} + {_gib(card.model.per_minute_gib)} per audio minute "
            "(ASR_TASK_MEMORY_GIB, ASR_TASK_MEMORY_PER_MINUTE_GIB)",
            f"  {'':<{width}}  at once: "
            + ", ".join(_at_once_words(card, m) for m in _SHOWN_MINUTES),
        ]
    unknown = UNKNOWN_AUDIO_SECONDS / 60.0
    lines.append(
        f"  a file whose length cannot be read is costed as {unknown:g} min of audio "
        f"({', '.join(f'{_gib(c.cost(unknown))} on {c.name}' for c in cards)})"
    )
    lines += _backfill_lines(settings)
    if settings.adaptive:
        lines.append(
            "  ASR_ADAPTIVE=true by memory: the count does not adapt (ASR_MAX_CONCURRENT only "
            "caps); each card's memory figures are learned from its OOMs and successes, "
            "starting from the settings above (shown in /stats)"
        )
    notes = [f"NOTE: {note}" for card in cards if (note := _cap_note(card))]
    warnings = [f"WARNING: {warning}" for card in cards if (warning := _long_warning(card))]
    return lines + notes, warnings


def _at_once_words(card: _Card, minutes: float) -> str:
    n, fits = card.at_once(minutes), card.by_memory(minutes)
    text = f"{minutes:g} min {n}"
    cost = card.cost(minutes)
    if cost > card.budget:
        return f"{text} (alone: {_gib(cost)} > {_gib(card.budget)})"
    if fits > card.cap:
        return f"{text} (the count cap; memory fits {fits})"
    return text


def _cap_note(card: _Card) -> str | None:
    """The count cap holds short files back: memory admission adds little for them."""
    fits = card.by_memory(_SHORT_MINUTES)
    if fits <= card.cap:
        return None
    return (
        f"{card.name}: ASR_MAX_CONCURRENT={card.cap} is what limits {_SHORT_MINUTES}-minute "
        f"files ({card.cap} at once where memory fits {fits}): admission by memory adds little "
        f"for short files; raise ASR_MAX_CONCURRENT (to {fits} for {_SHORT_MINUTES}-minute files) "
        "to let memory decide"
    )


def _long_warning(card: _Card) -> str | None:
    cost = card.cost(_LONG_MINUTES)
    if cost <= card.budget:
        return None
    return (
        f"{card.name}: a {_LONG_MINUTES}-minute file alone is estimated at {_gib(cost)}, more "
        f"than the card's {_gib(card.budget)}: such files run alone, and may still run out of "
        "memory; check ASR_GPU_MEMORY_GIB and the task figures (`gatekeeper tune "
        "--durations 60,300` measures them)"
    )


def _backfill_lines(settings: Settings) -> list[str]:
    queue = f"ASR_QUEUE_TIMEOUT={_num(settings.queue_timeout)} s"
    if settings.backfill_seconds <= 0:
        return [
            "  ASR_BACKFILL_SECONDS=0: strictly first-in first-out; a task that fits never "
            "starts before an earlier one that does not"
        ]
    return [
        "  backfill: a task that fits may start before an earlier one that does not, but the "
        f"head of the queue is passed for at most ASR_BACKFILL_SECONDS="
        f"{_num(settings.backfill_seconds)} s; then it is served next (nothing passes it). A "
        "long file at the head may so wait that long, plus until the tasks that passed it end, "
        f"more than in strict order; its queue wait is still bounded by {queue} (after that it "
        "is refused queue_timeout), so the worst case below is unchanged"
    ]


def describe_timeouts(settings: Settings) -> list[str]:
    """With ASR_TIMEOUT_PER_AUDIO_MINUTE: each attempt's timeout for a few lengths, and why the
    worst case still counts ASR_REQUEST_TIMEOUT. Nothing without it."""
    per_minute = settings.timeout_per_audio_minute
    if per_minute is None:
        return []
    config = ProxyConfig.from_settings(settings)
    request = _num(settings.request_timeout)
    shown = ", ".join(
        f"{m:g} min {_num(config.attempt_timeout(m * 60.0))} s" for m in _TIMEOUT_MINUTES
    )
    return [
        f"Attempt timeout by audio length (ASR_TIMEOUT_PER_AUDIO_MINUTE={_num(per_minute)} s per "
        f"minute, at least {_num(MIN_ATTEMPT_TIMEOUT)} s, at most ASR_REQUEST_TIMEOUT="
        f"{request} s): {shown}; a file whose length cannot be read gets {request} s. The worst "
        f"case below counts every attempt at ASR_REQUEST_TIMEOUT={request} s: it is the cap, and "
        "what files of unknown length get."
    ]


# -- the flags -----------------------------------------------------------------------------------


def add_check_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `gatekeeper serve` (same settings) plus the proxy to check against."""
    add_settings_arguments(parser)
    proxy = parser.add_argument_group("the proxy in front")
    proxy.add_argument(
        "--proxy-timeout",
        metavar="TIME",
        help="how long the proxy waits for an answer, in seconds or nginx units (3000s, 50m); "
        "exit 1 if that is shorter than the worst case",
    )
    proxy.add_argument(
        "--nginx-conf",
        metavar="PATH",
        type=Path,
        help="read proxy_read_timeout and proxy_send_timeout from this nginx config (each "
        "location proxying to the gatekeeper); exit 1 if one is shorter than the worst case",
    )
    proxy.add_argument(
        "--without-retry-after",
        action="store_true",
        help="the Whisper server never sends Retry-After: compare with the worst case without "
        f"it (by default each retry delay counts up to the {_num(RETRY_AFTER_CAP)} s cap)",
    )


# -- what to check -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Check:
    where: str
    timeouts: dict[str, float]
    body_size: int | None = None  # nginx's client_max_body_size there, when from a config


def _checks(args: argparse.Namespace) -> list[_Check]:
    """What to compare with the worst case; raises ValueError or OSError on bad input."""
    checks: list[_Check] = []
    if args.proxy_timeout is not None:
        checks.append(_Check("--proxy-timeout", {"": parse_nginx_time(args.proxy_timeout)}))
    if args.nginx_conf is not None:
        checks += _nginx_checks(args.nginx_conf)
    return checks


def _nginx_checks(path: Path) -> list[_Check]:
    locations = nginx_proxied_locations(path.read_text(encoding="utf-8"))
    tasks = [loc for loc in locations if not _own_endpoint(loc)]
    if not tasks:
        raise ValueError(f"{path}: no location that proxies to the gatekeeper")
    return [
        _Check(
            f"{path}:{loc.line} location {loc.location}",
            {"proxy_read_timeout": loc.read_timeout, "proxy_send_timeout": loc.send_timeout},
            loc.client_max_body_size,
        )
        for loc in tasks
    ]


def _own_endpoint(location: ProxiedLocation) -> bool:
    """An exact-match location for an endpoint the gatekeeper answers at once (never a task)."""
    words = location.location.split()
    return len(words) == 2 and words[0] == "=" and words[1] in _OWN_ENDPOINTS


# -- the command ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WorstCase:
    """What every check is compared with: the budget, whether Retry-After counts, the settings."""

    budget: TaskBudget
    with_retry_after: bool
    settings: Settings

    @property
    def limit(self) -> float:
        return self.budget.limit(upstream_retry_after=self.with_retry_after)

    def covered_by(self, seconds: float) -> bool:
        return self.budget.covered_by(seconds, upstream_retry_after=self.with_retry_after)


def run_check_config(args: argparse.Namespace) -> int:
    """Print the worst case; 1 if a given proxy timeout is shorter, 2 on bad settings or input."""
    try:
        settings = settings_loader(args)()
    except SettingsError as exc:
        return print_settings_error(exc)
    try:
        checks = _checks(args)
    except (OSError, ValueError) as exc:
        return print_error(_PROG, exc)
    worst = _WorstCase(from_settings(settings), not args.without_retry_after, settings)
    _print_worst_case(worst, describe_cluster(settings))
    verdicts = [_print_check(check, worst) for check in checks]
    if any(short for short, _ in verdicts):
        _warn_too_short(worst)
        return 1
    return 1 if any(small for _, small in verdicts) else 0


def _print_worst_case(worst: _WorstCase, cluster: tuple[list[str], list[str]]) -> None:
    for line in describe_servers(worst.settings) + pool_notes(worst.settings) + cluster[0]:
        print(line)
    for line in cluster[1]:
        print(line, file=sys.stderr)
    memory, warnings = describe_memory(worst.settings)
    for line in memory + describe_timeouts(worst.settings):
        print(line)
    for line in warnings:
        print(line, file=sys.stderr)
    for line in describe_budget(worst.budget, worst.settings) + _pool_budget_lines(worst.settings):
        print(line)
    which = "with" if worst.with_retry_after else "without"
    print(
        f"nginx's proxy_read_timeout and proxy_send_timeout (and the backend's HTTP client "
        f"timeout) must exceed {_num(worst.limit)} s (the worst case {which} Retry-After); "
        f"suggested: {suggested_timeout(worst.limit)}s."
    )


def _print_check(check: _Check, worst: _WorstCase) -> tuple[bool, bool]:
    """Print the verdict on one location; (its timeouts are too short, its body size too small)."""
    shown = ", ".join(f"{name} {_num(sec)} s".strip() for name, sec in check.timeouts.items())
    short = not all(worst.covered_by(sec) for sec in check.timeouts.values())
    print(f"{'TOO SHORT' if short else 'OK'}: {check.where}: {shown}")
    size, wanted = check.body_size, worst.settings.max_body_size
    small = size is not None and 0 < size < wanted
    if small:
        print(
            f"TOO SMALL: {check.where}: client_max_body_size {size} bytes is below "
            f"ASR_MAX_BODY_SIZE {wanted}: nginx refuses those uploads with "
            f"its own 413 (its default is 1m); set client_max_body_size "
            f"{format_nginx_size(wanted)}.",
            file=sys.stderr,
        )
    return short, small


def _warn_too_short(worst: _WorstCase) -> None:
    print(
        f"WARNING: the proxy gives up before the gatekeeper's worst case of {_num(worst.limit)} s: "
        "a task that queues, retries or runs long gets the proxy's 504 while the gatekeeper "
        f"is still working on it. Raise the timeouts marked TOO SHORT to "
        f"{suggested_timeout(worst.limit)}s.",
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gatekeeper.commands.check_config``: the check without the main CLI."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Print the longest one task can take with the current settings, and check "
        "that the proxy in front (nginx) waits longer.",
    )
    add_check_config_arguments(parser)
    return run_check_config(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
