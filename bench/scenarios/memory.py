"""Scenario 6 — admission by GPU memory (#16) against a clairvoyant bound, on both cards.

Section 4's seeded workload (Poisson at 10/min for an hour, audio log-uniform 10 s – 10 min) on
the simulator's two cards (`goodput.CARDS`), but every upload is a real WAV file of the task's
length (16-bit silence at a low sample rate, `gatekeeper.sim.audio.silent_wav`) and nothing
steers the simulator: the gatekeeper reads each file's length itself, and so does the simulator.
Replayed against:

- the gatekeeper admitting by memory with the true figures (the card's free memory, 2 GiB +
  0.8 GiB per audio minute, the simulator's own model);
- the gatekeeper admitting by memory with ASR_ADAPTIVE, learning from the seed's defaults (6 GiB
  a task, 0 per minute);
- today's adaptive count (ASR_ADAPTIVE by count, section 4's settings);
- HAProxy and the gatekeeper at fixed limits (section 4's settings, `goodput.story_settings`).

The oracle is computed, not measured: the same arrivals run in-process through the simulator's
own GPU model (`GpuMemory` for who fits, `GpuCompute` for the processor sharing), with a
clairvoyant scheduler that knows every task's true need and so never runs out of memory: at
every arrival and completion it starts, in arrival order, every waiting task that fits (a later
task may pass one that does not, without bound). In-process rather than against a simulator
process, because it is exact and deterministic (no clock, no process, no timing noise to
subtract) and costs milliseconds, while the simulator process runs the very same two classes.
The oracle is computed twice: under the queue rules every measured gatekeeper row runs with
(queue timeout 600 s, a queue of 10 × ASR_MAX_CONCURRENT) — the bound the targets are judged
against — and with no queue limits at all (the issue's own figure). A third in-process row runs
the gatekeeper's policy itself (true figures, backfill for at most ASR_BACKFILL_SECONDS): what
the bounded backfill alone costs against the unbounded oracle.

Per row: goodput (audio-minutes finished within the window per minute), ÷ the oracle, tasks
failed, queue wait p95 of short files (< 1 min of audio) and of all, the longest wait, and the
backfill bound: a task another passed must leave the queue by the time its bound ran out
(ASR_BACKFILL_SECONDS after it was first passed as the head of the queue; the moment it became
the head if nothing passed it then) or, later, when the card had drained (the last end of the
tasks started before that moment).

Every figure is in simulated time; the scenario runs at its own time scale
(`memory_time_scale`), every delay of both proxies divided by it.
"""

import asyncio
import dataclasses
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench.httpclient import HttpError, fetch
from bench.procs import Proc
from bench.scenarios import goodput
from bench.scenarios.common import CONTENT_TYPE, Ctx, JsonDict, multipart_parts
from bench.workload import Arrival, mean_audio_seconds, schedule
from gatekeeper.policy.quantiles import percentile
from gatekeeper.sim.audio import silent_wav
from gatekeeper.sim.memory import GpuCompute, GpuMemory
from gatekeeper.sim.server import SimConfig

__all__ = [
    "SHORT_SECONDS",
    "MemorySetup",
    "card_config",
    "figures",
    "memory_setups",
    "queue_sweep",
    "run",
    "simulate",
]

SHORT_SECONDS = 60.0
"""A short file: under a minute of audio (the issue's voice notes)."""

_QUEUE_TIMEOUT = 600.0  # section 4's, simulated seconds
_REQUEST_TIMEOUT = 300.0
_RETRY_DELAY = 10.0
_SLACK_REAL = 0.1
"""Real seconds of timing noise allowed when a measured wait is checked against the backfill
bound (client clock, log resolution, the event loop); × the time scale in simulated time."""
_SIM_FLAGS = {"--total-gib": "total_gib", "--reserved-gib": "reserved_gib"}
_HEAD, _TAIL = multipart_parts()


def card_config(card: str) -> SimConfig:
    """The simulator's configuration for one of `goodput.CARDS` (its flags, its defaults)."""
    args = goodput.CARDS[card][1]
    knobs: dict[str, Any] = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        knobs[_SIM_FLAGS[flag]] = float(value)
    return SimConfig(**knobs)


def _free_gib(card: str) -> float:
    config = card_config(card)
    return config.total_gib - config.reserved_gib


@dataclass(frozen=True, slots=True)
class MemorySetup:
    """One row of the scenario."""

    kind: str
    """oracle | oracle_open | policy (in-process); memory | learned | adaptive | haproxy |
    gatekeeper (measured)."""
    card: str
    limit: int | None = None  # fixed limit, or where the adaptive count starts

    @property
    def in_process(self) -> bool:
        return self.kind in ("oracle", "oracle_open", "policy")

    @property
    def backfills(self) -> bool:
        """Whether a later task may pass an earlier one here (the bound is checked)."""
        return self.kind in ("oracle", "oracle_open", "policy", "memory", "learned")

    def label(self, cfg_backfill: float) -> str:
        return {
            "oracle": "oracle: clairvoyant first fit, same queue rules",
            "oracle_open": "oracle without queue limits (the issue's)",
            "policy": f"model: first fit, backfill ≤ {cfg_backfill:g} s, true figures",
            "memory": "gatekeeper by memory, true figures",
            "learned": "gatekeeper by memory, learned from the seed's defaults",
            "adaptive": f"gatekeeper adaptive count from {self.limit} (today)",
            "haproxy": f"HAProxy at {self.limit}",
            "gatekeeper": f"gatekeeper at {self.limit}",
        }[self.kind]


def memory_setups(ctx: Ctx) -> list[MemorySetup]:
    """Every row of this run, card by card, in table order."""
    cfg = ctx.cfg
    setups: list[MemorySetup] = []
    for card in cfg.memory_cards:
        setups += [MemorySetup(k, card) for k in ("oracle", "oracle_open", "policy")]
        setups += [MemorySetup("memory", card), MemorySetup("learned", card)]
        setups.append(MemorySetup("adaptive", card, cfg.memory_adaptive_start))
        setups += [MemorySetup("haproxy", card, limit) for limit in cfg.memory_limits]
        setups += [MemorySetup("gatekeeper", card, limit) for limit in cfg.memory_limits]
    return setups


# -- one task's life, measured or computed (simulated seconds after the start) ----------------


@dataclass(slots=True)
class _Task:
    index: int
    audio: float
    queued: float
    """When it joined the queue (arrival + upload)."""
    start: float | None = None
    """When it got its slot (None: never did)."""
    left: float | None = None
    """When it left without a slot (refused: queue full or queue timeout)."""
    end: float | None = None
    """When its answer came (success or failure)."""
    kind: str = "pending"  # ok | refused | failed

    @property
    def out_of_queue(self) -> float | None:
        return self.start if self.start is not None else self.left


# -- the in-process rows: the simulator's GPU model and a scheduler over it --------------------


def simulate(
    arrivals: list[Arrival],
    sim: SimConfig,
    *,
    queue_timeout: float | None,
    max_queue: int | None,
    backfill: float | None,
) -> list[_Task]:
    """Run `arrivals` through the simulator's GPU model with a scheduler that knows every
    task's true memory need, so nothing ever runs out of memory.

    Queue first-in first-out; whenever a task arrives, finishes or leaves, the head starts if it
    fits, else the first later task that fits starts instead (for at most `backfill` seconds
    after the head was first passed, 0: never; None: forever — the clairvoyant first fit).
    `queue_timeout`: a task waiting that long leaves; `max_queue`: an arrival finding that
    many waiting is refused.
    """
    memory = GpuMemory(
        total_gib=sim.total_gib,
        reserved_gib=sim.reserved_gib,
        base_gib=sim.task_base_gib,
        per_minute_gib=sim.task_gib_per_minute,
    )
    compute = GpuCompute(parallel_gain=sim.parallel_gain, max_speedup=sim.max_speedup)
    tasks = [_Task(a.index, a.audio_seconds, a.at) for a in arrivals]
    queue: list[int] = []
    running: set[str] = set()
    passed_at: dict[int, float] = {}  # when a later task first started ahead of the head
    now = 0.0
    following = 0  # the next arrival

    def need(k: int) -> float:
        return memory.need_gib(tasks[k].audio)

    def start(k: int) -> None:
        queue.remove(k)
        if not memory.try_allocate(str(k), need(k)):  # bigger than the card: fails alone
            tasks[k].start = tasks[k].end = now
            tasks[k].kind = "failed"
            return
        compute.add(str(k), sim.rtf * tasks[k].audio, now)
        running.add(str(k))
        tasks[k].start = now

    def fits(k: int) -> bool:
        return not running or memory.fits(need(k))

    def hand_over() -> None:
        # As the gate does it: the bound is kept on the head from its first pass.
        while queue:
            first = queue[0]
            if fits(first):
                start(first)
                continue
            if backfill is not None and now - passed_at.get(first, now) >= backfill:
                return
            passer = next((k for k in queue[1:] if fits(k)), None)
            if passer is None:
                return
            passed_at.setdefault(first, now)
            start(passer)

    while True:
        events = [math.inf]
        if following < len(arrivals):
            events.append(arrivals[following].at)
        if running:
            events.append(now + min(compute.seconds_until(t) for t in running))
        if queue and queue_timeout is not None:
            events.append(min(tasks[k].queued for k in queue) + queue_timeout)
        now = min(events)
        if now == math.inf:
            return tasks
        for task_id in compute.advance(now):
            memory.release(task_id)
            running.discard(task_id)
            done = tasks[int(task_id)]
            done.end, done.kind = now, "ok"
        if queue_timeout is not None:
            for k in [k for k in queue if tasks[k].queued + queue_timeout <= now + 1e-9]:
                queue.remove(k)
                tasks[k].left, tasks[k].kind = now, "refused"
        while following < len(arrivals) and arrivals[following].at <= now:
            k = following
            following += 1
            if max_queue is not None and len(queue) >= max_queue:
                tasks[k].left, tasks[k].kind = now, "refused"
            else:
                queue.append(k)
        hand_over()


# -- figures from the tasks of one or several runs --------------------------------------------


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _passed_and_bounds(
    tasks: list[_Task], backfill: float | None, slack: float
) -> tuple[list[_Task], list[float]]:
    """The tasks a later one passed, and for each how far past its bound it got a slot (or
    left: a queue timeout) — zero or less is within the bound; no bound (None), no figures."""
    order = sorted((t for t in tasks if t.out_of_queue is not None), key=lambda t: t.queued)
    # The earliest start among the tasks queued after each one.
    later_start = [math.inf] * (len(order) + 1)
    for i in range(len(order) - 1, -1, -1):
        s = order[i].start
        later_start[i] = min(later_start[i + 1], math.inf if s is None else s)
    later_starts = [math.inf if t.start is None else t.start for t in order]
    spans = [(t.start, t.end) for t in tasks if t.start is not None and t.end is not None]
    passed: list[_Task] = []
    excess: list[float] = []
    head_from = -math.inf  # when everything queued before this one had left the queue
    for i, task in enumerate(order):
        out = task.out_of_queue
        assert out is not None
        if later_start[i + 1] < out - slack:
            passed.append(task)
            if backfill is not None:
                # The bound runs from the first pass while it was the head; with none, nothing
                # started after it became the head: the card only drained.
                became_head = max(task.queued, head_from)
                passes = [s for s in later_starts[i + 1 :] if became_head <= s < out - slack]
                deadline = min(passes) + backfill if passes else became_head
                drained = max((end for start, end in spans if start <= deadline), default=deadline)
                excess.append(out - max(deadline, drained))
        head_from = max(head_from, out)
    return passed, excess


def figures(
    runs: list[list[_Task]],
    *,
    minutes: float,
    passing: bool,
    backfill: float | None,
    slack: float,
) -> JsonDict:
    """The scenario's figures over one or several runs of the same schedule: goodput per run
    (and their mean), waits pooled; with `passing`, the tasks another passed, and with a
    `backfill` bound too, each checked against it, run by run."""
    window = minutes * 60.0
    goodputs = [
        round(
            math.fsum(t.audio for t in run if t.kind == "ok" and (t.end or 0.0) <= window)
            / 60.0
            / minutes,
            2,
        )
        for run in runs
    ]
    every = [t for run in runs for t in run]
    waits = [t.start - t.queued for t in every if t.start is not None]
    short = [t.start - t.queued for t in every if t.start is not None and t.audio < SHORT_SECONDS]
    ok = sum(1 for t in every if t.kind == "ok")
    failed = sum(1 for t in every if t.kind == "failed")
    refused = sum(1 for t in every if t.kind == "refused")
    row: JsonDict = {
        "goodput_audio_min_per_min": round(math.fsum(goodputs) / len(goodputs), 2),
        "goodput_runs": goodputs,
        "tasks": len(every),
        "succeeded": ok,
        "failed": failed,
        "refused": refused,
        "failed_pct": round(100.0 * failed / (ok + failed), 2) if ok + failed else 0.0,
        "queue_wait_p50_s": _round(percentile(waits, 0.5)),
        "queue_wait_p95_s": _round(percentile(waits, 0.95)),
        "queue_wait_max_s": _round(max(waits, default=None)),
        "short_tasks_started": len(short),
        "short_queue_wait_p50_s": _round(percentile(short, 0.5)),
        "short_queue_wait_p95_s": _round(percentile(short, 0.95)),
        "queue_waits_logged": len(waits),
        "passed_tasks": None,
        "passed_timed_out": None,
        "passed_wait_max_s": None,
        "passed_over_bound": None,
        "passed_worst_vs_bound_s": None,
        "bound_slack_s": None,
    }
    if passing:
        passed: list[_Task] = []
        excess: list[float] = []
        for run in runs:
            p, e = _passed_and_bounds(run, backfill, slack)
            passed += p
            excess += e
        passed_waits = [out - t.queued for t in passed if (out := t.out_of_queue) is not None]
        row.update(
            passed_tasks=len(passed),
            passed_timed_out=sum(1 for t in passed if t.start is None),
            passed_wait_max_s=_round(max(passed_waits, default=None)),
        )
        if backfill is not None:
            row.update(
                passed_over_bound=sum(1 for e in excess if e > slack),
                passed_worst_vs_bound_s=_round(max(excess, default=None)),
                bound_slack_s=round(slack, 2),
            )
    return row


# -- the measured rows ------------------------------------------------------------------------


class _Sent(goodput._Outcome):
    """A task's outcome, as goodput.py keeps it, when it was sent (real seconds), and whether
    the connection closed before any answer could be read."""

    __slots__ = ("cut", "sent")

    def __init__(self, arrival: Arrival) -> None:
        super().__init__(arrival)
        self.sent = 0.0
        self.cut = False


def wav_body(seconds: float, sample_rate: int) -> bytes:
    """A one-file multipart body holding a WAV file of silence lasting `seconds`."""
    return _HEAD + silent_wav(seconds, sample_rate=sample_rate) + _TAIL


async def _replay(ctx: Ctx, port: int, arrivals: list[Arrival]) -> list[_Sent]:
    """Every arrival at its (scaled) time on its own connection, a real WAV file of its length,
    nothing that steers the simulator."""
    cfg = ctx.cfg
    scale = cfg.time_scale
    per_task_limit = (
        _QUEUE_TIMEOUT + 4 * _REQUEST_TIMEOUT + (10 + 30 + 90 + 15) * _RETRY_DELAY / 10
    ) / scale + 30.0
    outcomes = [_Sent(a) for a in arrivals]
    began = time.monotonic()

    async def one(arrival: Arrival, outcome: _Sent) -> None:
        delay = began + arrival.at / scale - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        body = wav_body(arrival.audio_seconds, cfg.memory_wav_rate)
        headers = (("Content-Type", CONTENT_TYPE), ("X-Request-ID", f"bench-{arrival.index}"))
        outcome.sent = time.monotonic() - began
        try:
            response = await fetch(
                "127.0.0.1",
                port,
                "POST",
                "/asr?output=json",
                headers=headers,
                body=body,
                within=per_task_limit,
            )
        except (HttpError, TimeoutError) as exc:
            outcome.kind = "error"
            outcome.cut = "before the answer" in str(exc)
            outcome.done = time.monotonic() - began
            return
        outcome.done = time.monotonic() - began
        outcome.status = response.status
        outcome.attempts = goodput.attempts_of(response)
        outcome.kind = goodput.answer_kind(response)

    await asyncio.gather(*(one(a, o) for a, o in zip(arrivals, outcomes, strict=True)))
    return outcomes


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def _gatekeeper_lines(log: str) -> dict[int, dict[str, str]]:
    """Each bench task's finish (or failure) line: its fields, by task index."""
    found: dict[int, dict[str, str]] = {}
    for line in log.splitlines():
        if "task_id=bench-" not in line or "queue_wait=" not in line:
            continue
        fields = dict(_FIELD.findall(line))
        found[int(fields["task_id"].removeprefix("bench-"))] = fields
    return found


def _haproxy_waits(log: str) -> dict[int, float]:
    """HAProxy's %Tw of every bench task that got a server, real seconds, by task index."""
    waits = {}
    for line in log.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].startswith("bench-") and parts[2] != "503":
            tw = int(parts[1])
            if tw >= 0:
                waits[int(parts[0].removeprefix("bench-"))] = tw / 1000.0
    return waits


def _learned_path(log: str) -> list[str]:
    """The learner's changes from the gatekeeper's log: `base+per-minute reason`."""
    path = []
    for line in log.splitlines():
        if "task_memory_gib=" in line and "per_minute_gib=" in line:
            fields = dict(_FIELD.findall(line))
            path.append(
                f"{fields['task_memory_gib']}+{fields['per_minute_gib']}/min "
                f"{fields.get('reason', '?')}"
            )
    return path


@dataclass
class _Measured:
    data: goodput._RunData  # goodput.py's record of a run (for its row's columns)
    tasks: list[_Task]
    unread_refusals: int = 0
    audio_checked: int = 0
    audio_mismatched: list[str] = field(default_factory=list)
    learned: list[str] = field(default_factory=list)
    memory_view: JsonDict | None = None


def memory_settings(ctx: Ctx, card: str, *, learned: bool) -> dict[str, object]:
    """The gatekeeper admitting by memory on `card`: the count only caps (`memory_cap`, queue 10
    × it), every duration divided by the time scale; the true figures, or learning (ASR_ADAPTIVE,
    the adaptive knobs as in section 4) from the seed's defaults."""
    cfg = ctx.cfg
    scale = cfg.time_scale
    cap = cfg.memory_cap
    settings: dict[str, object]
    if learned:
        settings = goodput.adaptive_settings(cap, cap, scale)
        base, per_minute = cfg.memory_seed_figures
    else:
        settings = dict(goodput.story_settings(cap, scale))
        sim = card_config(card)
        base, per_minute = sim.task_base_gib, sim.task_gib_per_minute
    settings.update(
        max_queue=10 * cap,
        gpu_memory_gib=_free_gib(card),
        task_memory_gib=base,
        task_memory_per_minute_gib=per_minute,
        backfill_seconds=cfg.memory_backfill_seconds / scale,
    )
    return settings


def _settings(ctx: Ctx, one: MemorySetup) -> dict[str, object]:
    cfg = ctx.cfg
    if one.kind in ("memory", "learned"):
        return memory_settings(ctx, one.card, learned=one.kind == "learned")
    assert one.limit is not None
    if one.kind == "adaptive":
        return goodput.adaptive_settings(one.limit, cfg.adaptive_maximum, cfg.time_scale)
    return dict(goodput.story_settings(one.limit, cfg.time_scale))


async def _measure(ctx: Ctx, one: MemorySetup, arrivals: list[Arrival]) -> _Measured:
    cfg = ctx.cfg
    scale = cfg.time_scale
    procs = ctx.procs
    sim = await procs.sim(
        "--time-scale", str(scale), "--seed", str(ctx.seed), *goodput.CARDS[one.card][1]
    )
    proxy: Proc
    if one.kind == "haproxy":
        assert one.limit is not None
        story = goodput.story_settings(one.limit, scale)
        proxy = await procs.haproxy(
            sim.port,
            maxconn=one.limit,
            maxqueue=10 * one.limit,
            timeout_queue=story["queue_timeout"],
            timeout_server=story["request_timeout"],
            log_requests=True,
        )
    else:
        proxy = await procs.gatekeeper(sim.url, _settings(ctx, one))
    began = time.monotonic()
    outcomes = await _replay(ctx, proxy.port, arrivals)
    real_seconds = time.monotonic() - began
    sim_state = await goodput._json(sim.port, "/sim/state")
    gk = one.kind != "haproxy"
    gk_stats = await goodput._json(proxy.port, "/stats") if gk else None
    peak = proxy.peak_rss_mib() if gk else None
    await procs.kill(proxy)
    await procs.kill(sim)
    log = proxy.log_text()
    if gk:
        counted = int((gk_stats or {}).get("rejected_tasks") or 0)
    else:
        counted = sum(1 for line in log.splitlines() if line.split()[2:3] == ["503"])
    unread = _unread_refusals(outcomes, counted)
    tasks = _tasks(outcomes, log, gk=gk, scale=scale)
    waits = [t.start - t.queued for t in tasks if t.start is not None]
    measured = _Measured(
        goodput._RunData(list(outcomes), waits, sim_state, gk_stats, peak, real_seconds),
        tasks,
        unread_refusals=unread,
    )
    _check_audio(measured, arrivals, sim_state, log if gk else None)
    if one.kind in ("memory", "learned"):
        measured.learned = _learned_path(log)
        upstreams = (gk_stats or {}).get("upstreams") or [{}]
        measured.memory_view = upstreams[0].get("memory_gib")
    return measured


def _unread_refusals(outcomes: list[_Sent], counted: int) -> int:
    """Refusals the proxy counted that the client could not read, booked as refusals.

    A proxy that refuses a task before its upload is in (HAProxy's `http-request return`, or a
    queue timeout while the body still comes) and then closes the connection makes the kernel
    reset it over the unread body: the client sees the connection close before any answer,
    not the 503. Such tasks, up to the number of refusals the proxy itself counted (HAProxy's
    log, the gatekeeper's /stats) beyond those the client read, are refusals, not failures.
    """
    unread = max(0, counted - sum(1 for o in outcomes if o.kind == "refused"))
    cut = [o for o in outcomes if o.kind == "error" and o.cut]
    for outcome in cut[:unread]:
        outcome.kind, outcome.status = "refused", 503
    return min(unread, len(cut))


def _tasks(outcomes: list[_Sent], log: str, *, gk: bool, scale: float) -> list[_Task]:
    """Each task's life in simulated seconds: from the client's clock (sent, answered) and the
    proxy's log (upload, queue wait)."""
    lines = _gatekeeper_lines(log) if gk else {}
    hp_waits = {} if gk else _haproxy_waits(log)
    tasks = []
    for o in outcomes:
        queued = o.sent
        wait: float | None = None
        if gk and o.index in lines:
            fields = lines[o.index]
            queued += float(fields.get("upload", "0"))
            wait = float(fields["queue_wait"])
        elif not gk and o.index in hp_waits:
            wait = hp_waits[o.index]
        task = _Task(o.index, o.audio, queued * scale)
        if wait is not None:
            task.start = (queued + wait) * scale
        task.end = o.done * scale
        if o.kind == "ok":
            task.kind = "ok"
        elif o.kind == "refused" and wait is None:
            task.kind, task.left, task.end = "refused", o.done * scale, None
        elif o.kind == "refused":  # a slot, then a 503 from upstream: answered, not refused
            task.kind = "failed"
        else:
            task.kind = "failed"
        tasks.append(task)
    return tasks


def _check_audio(
    measured: _Measured, arrivals: list[Arrival], sim_state: JsonDict, log: str | None
) -> None:
    """The lengths the simulator (its recent tasks) and the gatekeeper (its log) read from the
    files against the schedule's."""
    truth = {f"bench-{a.index}": a.audio_seconds for a in arrivals}
    for record in sim_state.get("recent") or []:
        rid = record.get("request_id")
        if rid in truth:
            measured.audio_checked += 1
            if abs(float(record["audio_seconds"]) - truth[rid]) > 0.01:
                measured.audio_mismatched.append(f"sim {rid}: {record['audio_seconds']}")
    if log is None:
        return
    for index, fields in _gatekeeper_lines(log).items():
        rid = f"bench-{index}"
        measured.audio_checked += 1
        read = fields.get("audio", "unknown")
        if read == "unknown" or abs(float(read) - truth[rid]) > 0.01:
            measured.audio_mismatched.append(f"gatekeeper {rid}: {read}")


# -- the rows ---------------------------------------------------------------------------------


def _computed_row(ctx: Ctx, one: MemorySetup, arrivals: list[Arrival]) -> JsonDict:
    cfg = ctx.cfg
    sim = card_config(one.card)
    queue_rules = one.kind != "oracle_open"
    backfill = cfg.memory_backfill_seconds if one.kind == "policy" else None
    tasks = simulate(
        arrivals,
        sim,
        queue_timeout=_QUEUE_TIMEOUT if queue_rules else None,
        max_queue=10 * cfg.memory_cap if queue_rules else None,
        backfill=backfill,
    )
    row = figures([tasks], minutes=cfg.sim_minutes, passing=True, backfill=backfill, slack=1e-6)
    memory = GpuMemory(total_gib=sim.total_gib, reserved_gib=sim.reserved_gib)
    row.update(
        setup=one.kind,
        card=one.card,
        label=one.label(cfg.memory_backfill_seconds),
        computed=True,
        runs=1,
        oom_answers=0,
        max_active_on_gpu=_most_at_once(tasks),
        peak_memory_gib=round(_peak_memory(tasks, sim) + memory.reserved_gib, 3),
    )
    return row


def _most_at_once(tasks: Iterable[_Task]) -> int:
    edges = sorted(
        [(t.start, 1) for t in tasks if t.start is not None and t.end is not None]
        + [(t.end, -1) for t in tasks if t.start is not None and t.end is not None]
    )
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _peak_memory(tasks: Iterable[_Task], sim: SimConfig) -> float:
    edges: list[tuple[float, float]] = []
    for t in tasks:
        if t.start is not None and t.end is not None and t.kind == "ok":
            need = sim.task_base_gib + sim.task_gib_per_minute * t.audio / 60.0
            edges += [(t.start, need), (t.end, -need)]
    peak = now = 0.0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # ends first at a tie
        now += step
        peak = max(peak, now)
    return peak


def _measured_row(ctx: Ctx, one: MemorySetup, runs: list[_Measured]) -> JsonDict:
    cfg = ctx.cfg
    base = goodput.Setup(
        "haproxy" if one.kind == "haproxy" else "gatekeeper",
        one.limit,
        one.card,
        adaptive=one.kind == "adaptive",
    )
    row = goodput._row(ctx, base, [m.data for m in runs])
    mine = figures(
        [m.tasks for m in runs],
        minutes=cfg.sim_minutes,
        passing=one.backfills,
        backfill=cfg.memory_backfill_seconds if one.backfills else None,
        slack=_SLACK_REAL * cfg.time_scale,
    )
    # Goodput and the counts as section 4 computes them (answers within the window); waits,
    # passes and the bound from the tasks.
    for key in ("goodput_audio_min_per_min", "goodput_runs", "tasks", "succeeded", "failed"):
        mine.pop(key)
    mine.pop("refused")
    answered = row["succeeded"] + row["failed"]
    mine["failed_pct"] = round(100.0 * row["failed"] / answered, 2) if answered else 0.0
    row.update(mine)
    row.update(
        setup=one.kind,
        label=one.label(cfg.memory_backfill_seconds),
        computed=False,
        refusals_unread=sum(m.unread_refusals for m in runs),
        client_errors=sum(1 for m in runs for o in m.data.outcomes if o.kind == "error"),
        audio_lengths_checked=sum(m.audio_checked for m in runs),
        audio_lengths_wrong=[x for m in runs for x in m.audio_mismatched][:10],
    )
    if one.kind in ("memory", "learned"):
        row["memory_runs"] = [
            {
                "ended_at": m.memory_view,
                "changes": len(m.learned),
                "last_changes": m.learned[-12:],
            }
            for m in runs
        ]
    return row


async def run(ctx: Ctx) -> JsonDict:
    # Every figure of the scenario, section 4's code's included, at this scenario's time scale.
    ctx = dataclasses.replace(
        ctx, cfg=dataclasses.replace(ctx.cfg, time_scale=ctx.cfg.memory_time_scale)
    )
    cfg = ctx.cfg
    arrivals = schedule(
        seed=ctx.seed, rate_per_minute=cfg.arrival_rate_per_minute, minutes=cfg.sim_minutes
    )
    setups = memory_setups(ctx)
    measured = [one for one in setups if not one.in_process]
    runs: dict[MemorySetup, list[_Measured]] = {one: [] for one in measured}
    pending = [(repeat, one) for repeat in range(cfg.memory_repeats) for one in measured]
    total = len(pending)
    done = 0

    async def replay(repeat: int, one: MemorySetup) -> None:
        nonlocal done
        result = await _measure(ctx, one, arrivals)
        runs[one].append(result)
        done += 1
        ctx.say(
            f"memory {done}/{total}: {len(arrivals)} tasks, {cfg.sim_minutes:g} simulated min, "
            f"{one.label(cfg.memory_backfill_seconds)}, {one.card} card (run {repeat + 1}/"
            f"{cfg.memory_repeats}) in {result.data.real_seconds:.0f} s"
        )

    width = max(1, cfg.memory_parallel)
    for first in range(0, total, width):
        await asyncio.gather(*(replay(r, one) for r, one in pending[first : first + width]))
    rows = [
        _computed_row(ctx, one, arrivals) if one.in_process else _measured_row(ctx, one, runs[one])
        for one in setups
    ]
    for card in cfg.memory_cards:
        oracle = next(r for r in rows if r["card"] == card and r["setup"] == "oracle")
        for row in rows:
            if row["card"] == card:
                g = row["goodput_audio_min_per_min"]
                row["vs_oracle"] = round(g / oracle["goodput_audio_min_per_min"], 3)
    return {
        "setup": _describe(ctx, arrivals),
        "rows": rows,
        "queue_sweep": {card: queue_sweep(ctx, card, arrivals) for card in cfg.memory_cards},
    }


def queue_sweep(ctx: Ctx, card: str, arrivals: list[Arrival]) -> list[JsonDict]:
    """What the queue's length trades on `card`, computed on the simulator's model: goodput
    against short files' waits, for the clairvoyant first fit and the bounded backfill."""
    cfg = ctx.cfg
    sim = card_config(card)
    points = []
    for places in dict.fromkeys((10 * cfg.memory_cap, 60, 30, 20, 10)):
        for backfill in (None, cfg.memory_backfill_seconds):
            tasks = simulate(
                arrivals, sim, queue_timeout=_QUEUE_TIMEOUT, max_queue=places, backfill=backfill
            )
            f = figures([tasks], minutes=cfg.sim_minutes, passing=False, backfill=None, slack=0.0)
            points.append(
                {
                    "max_queue": places,
                    "backfill_seconds": backfill,
                    **{
                        k: f[k]
                        for k in (
                            "goodput_audio_min_per_min",
                            "refused",
                            "short_queue_wait_p95_s",
                            "queue_wait_p95_s",
                        )
                    },
                }
            )
    return points


def _describe(ctx: Ctx, arrivals: list[Arrival]) -> JsonDict:
    cfg = ctx.cfg
    scale = cfg.time_scale
    offered = sum(a.audio_seconds for a in arrivals) / 60.0 / cfg.sim_minutes
    base, per_minute = cfg.memory_seed_figures
    return {
        "seed": ctx.seed,
        "time_scale": scale,
        "simulated_minutes": cfg.sim_minutes,
        "arrivals": len(arrivals),
        "arrival_rate_per_min": cfg.arrival_rate_per_minute,
        "audio": "log-uniform 10 s – 10 min, mean "
        f"{mean_audio_seconds() / 60:.1f} min (this draw: "
        f"{sum(a.audio_seconds for a in arrivals) / len(arrivals) / 60:.2f} min)",
        "short_files": sum(1 for a in arrivals if a.audio_seconds < SHORT_SECONDS),
        "offered_audio_min_per_min": round(offered, 1),
        "cards": {
            card: {
                "description": goodput.CARDS[card][0],
                "total_gib": card_config(card).total_gib,
                "free_gib": _free_gib(card),
            }
            for card in cfg.memory_cards
        },
        "uploads": f"a WAV file per task (16-bit mono silence at {cfg.memory_wav_rate} Hz, "
        f"{2 * cfg.memory_wav_rate / 1000:g} kB per audio second), multipart; no "
        "X-Sim-Audio-Seconds: the gatekeeper and the simulator read the length from the file",
        "simulator": "a task needs 2 + 0.8 GiB per audio minute, rtf 0.1, parallel gain 0.3, "
        "max speed-up 2",
        "memory_settings": f"ASR_GPU_MEMORY_GIB = the card's free memory, ASR_MAX_CONCURRENT="
        f"{cfg.memory_cap} (only caps), ASR_MAX_QUEUE={10 * cfg.memory_cap}, "
        f"ASR_BACKFILL_SECONDS={cfg.memory_backfill_seconds:g}; true figures: "
        "ASR_TASK_MEMORY_GIB=2, ASR_TASK_MEMORY_PER_MINUTE_GIB=0.8; learned: ASR_ADAPTIVE=true "
        f"from ASR_TASK_MEMORY_GIB={base:g}, ASR_TASK_MEMORY_PER_MINUTE_GIB={per_minute:g} (the "
        "seed's defaults), the adaptive knobs at their defaults as in section 4; queue timeout "
        "600 s, request timeout 300 s, 3 retries, retry delay 10 s — all durations divided by "
        "the time scale",
        "count_settings": "section 4's: the gatekeeper at a fixed limit L (queue 10 × L, "
        "cool-down 15 s), the adaptive count (bounds 1…"
        f"{cfg.adaptive_maximum}, started at {cfg.memory_adaptive_start}), HAProxy maxconn L "
        "maxqueue 10 × L; queue timeout 600 s, request timeout 300 s",
        "oracle": "in-process, the simulator's own GpuMemory and GpuCompute over the same "
        "arrivals; whenever a task arrives or finishes, every waiting task that fits starts, in "
        "arrival order (a later task passes one that does not fit, without bound); queue rules "
        f"as the memory rows' (timeout 600 s, queue {10 * cfg.memory_cap}), or none",
        "backfill_bound": "a task another passed must leave the queue by max(the moment it "
        f"was first passed as the head + {cfg.memory_backfill_seconds:g} s (or became the head, "
        "if nothing passed it then), the last end of the tasks started before that moment); "
        f"measured rows get {_SLACK_REAL:g} real s of slack ({_SLACK_REAL * scale:g} simulated s)",
        "repeats": cfg.memory_repeats,
        "parallel": cfg.memory_parallel,
        "client": "one connection per task, no retry of refusals",
    }
