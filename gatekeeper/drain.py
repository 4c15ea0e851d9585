"""The drain: how the gatekeeper stops, in one place (`serve` and the tests use it alike).

In order: stop admitting (new tasks get 503 shutting_down, other paths still pass), let running
and queued tasks finish for up to the grace period (or until `hurry` is set: a second signal),
then end the grace: refuse what still waits in the queue, stop uploads still coming in and
tasks between two attempts (each answers 503 shutting_down itself), and cancel what still runs
upstream (a task still waiting for the Whisper server answers 503; one whose answer was already
streaming is cut).
"""

import asyncio
from dataclasses import dataclass

from gatekeeper.policy.outcomes import RejectReason
from gatekeeper.proxy import Proxy

__all__ = ["FINAL_FLUSH", "DrainReport", "drain", "end_grace"]

FINAL_FLUSH = 1.0
"""Seconds the tasks stopped at the end of the grace period get to write their last answers."""


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What the end of the grace period found (for the last log line)."""

    refused_waiting: int
    """Tasks refused 503 shutting_down: queued, uploading, or between two attempts."""
    stopped_running: int
    """Runners (and holds of timed-out attempts) cancelled while still working upstream."""


async def drain(proxy: Proxy, *, grace: float, hurry: asyncio.Event | None = None) -> DrainReport:
    """Stop admitting, wait up to `grace` seconds for the work to end, then end the grace."""
    proxy.gate.begin_shutdown()
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(proxy.gate.wait_idle())]
    if hurry is not None:
        waits.append(asyncio.ensure_future(hurry.wait()))
    try:
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return await end_grace(proxy)


async def end_grace(proxy: Proxy) -> DrainReport:
    """The grace period is over: answer or stop everything still in the gatekeeper."""
    proxy.gate.begin_shutdown()
    refused = proxy.gate.refuse_waiting(RejectReason.SHUTTING_DOWN)
    refused += proxy.stop_uploads()
    between = proxy.stop_retries()  # tasks between attempts answer 503 themselves
    refused += len(between)
    if between:
        await asyncio.wait(between, timeout=FINAL_FLUSH)
    running = [task for task in proxy.runners if not task.done()]
    for task in running:
        task.cancel()
    if running:
        await asyncio.wait(running, timeout=FINAL_FLUSH)
    return DrainReport(refused_waiting=refused, stopped_running=len(running))
