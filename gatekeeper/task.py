"""One admitted task in flight: what the handler hands the runner, and the holds after it."""

import asyncio

from aiohttp import web
from multidict import CIMultiDict

from gatekeeper.gate import Ticket
from gatekeeper.ledger import TaskRecord
from gatekeeper.policy.outcomes import HoldEnd
from gatekeeper.spool import SpooledBody

__all__ = ["Task"]


class Task:
    """Everything one admitted task carries from the handler into its runner."""

    __slots__ = (
        "answering",
        "body",
        "gone",
        "headers",
        "hold",
        "record",
        "request",
        "runner",
        "ticket",
    )

    def __init__(
        self,
        request: web.Request,
        record: TaskRecord,
        ticket: Ticket,
        body: SpooledBody,
        headers: CIMultiDict[str],
    ) -> None:
        self.request = request
        self.record = record
        self.ticket = ticket
        self.body = body
        self.headers = headers
        self.gone = asyncio.Event()
        self.runner: asyncio.Task[web.StreamResponse] | None = None
        self.answering = False  # the upstream's answer has begun to go to the client
        # A timed-out last attempt the Whisper server may still compute: it owns the slot and
        # the body from the runner's end until the server is done (or ASR_TIMEOUT_HOLD).
        self.hold: asyncio.Task[HoldEnd] | None = None
