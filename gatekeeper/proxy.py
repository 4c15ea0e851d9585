"""The task path, assembled: the handler, the runner, the limiter and the ledger, wired once.

Where each part of a task's life lives:
- `handler.py`: routing, the upload, admission and the wait in the queue;
- `runner.py`: the attempts with a slot, retries, holds of timed-out attempts;
- `relay.py`: streaming answers to the client, discarding unwanted ones, pass-through;
- `limiter.py`: the gate and its limit (fixed or adaptive), told every attempt's outcome;
- `ledger.py`: every task's one outcome; `refusals.py`: every 503 服务繁忙.
"""

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from gatekeeper.clock import Clock
from gatekeeper.config import ProxyConfig
from gatekeeper.gate import Gate
from gatekeeper.handler import Handler
from gatekeeper.health import UpstreamHealth
from gatekeeper.ledger import Ledger
from gatekeeper.limiter import Limiter
from gatekeeper.logs import Event, log_event
from gatekeeper.policy.adaptive import AdaptiveLimit
from gatekeeper.refusals import Refusals
from gatekeeper.runner import Runner
from gatekeeper.settings import Settings
from gatekeeper.state import LiveState

__all__ = ["Proxy"]


class Proxy:
    """The app's one task path: built from the settings, reconfigured live, drained at the end."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        rng: random.Random,
        session: Callable[[], aiohttp.ClientSession],
        suspect: Callable[[int], None] | None = None,
    ) -> None:
        self.config = ProxyConfig.from_settings(settings)
        self.clock = clock
        self.limiter = Limiter(
            settings,
            clock=clock,
            on_change=lambda server, change: self.state.limit_changed(change.kind, server),
            cooling=self._cooling,
        )
        self.state = LiveState(
            self.limiter.gate,
            now=clock.monotonic,
            servers=tuple(zip(settings.upstream_names, settings.upstream_urls, strict=True)),
        )
        self.state.adaptive_view = lambda server: self.limiter.adaptive_view(
            server, wall_now=clock.wall()
        )
        self.state.memory_view = self.limiter.memory_view
        refusals = Refusals(self.limiter.gate, self.state, clock)
        self.runner = Runner(
            self._current,
            limiter=self.limiter,
            state=self.state,
            refusals=refusals,
            clock=clock,
            rng=rng,
            session=session,
            suspect=suspect or (lambda server: None),
        )
        self.handler = Handler(
            self._current,
            gate=self.limiter.gate,
            ledger=Ledger(self.state, now=clock.monotonic),
            refusals=refusals,
            runner=self.runner,
            session=session,
            new_id=lambda: f"{rng.getrandbits(128):032x}",  # from the injected random source
            clock=clock,
            state=self.state,
        )

    def _current(self) -> ProxyConfig:
        return self.config

    def _cooling(self, server: int) -> bool:
        """Whether a task starting on `server` now would first cool down after its last OOM."""
        cfg, last = self.config, self.state.servers[server].last_oom_monotonic
        if cfg.oom_cooldown <= 0 or last is None:
            return False
        return self.clock.monotonic() - last < cfg.oom_window

    def upstream_checked(self, server: int, health: UpstreamHealth) -> None:
        """A health probe's verdict on one server: a server found down gets no new tasks (and
        its running ones end by the usual rules) until a probe finds it up again."""
        name = self.config.upstream_names[server]
        was_usable = self.gate.counts().servers[server].usable
        usable = health.up is not False
        self.state.set_upstream(server, health)
        self.gate.set_usable(server, usable)
        if was_usable and not usable:
            log_event(Event.UPSTREAM_DOWN, logging.WARNING, upstream=name, error=health.error)
        elif usable and not was_usable:
            log_event(Event.UPSTREAM_UP, upstream=name, state=health.state.value)

    @property
    def gate(self) -> Gate:
        return self.limiter.gate

    @property
    def adaptive(self) -> AdaptiveLimit | None:
        """The adaptive limit, read-only (None when the limit is fixed)."""
        return self.limiter.adaptive

    @property
    def runners(self) -> set["asyncio.Task[Any]"]:
        """Attempt loops and holds still working upstream."""
        return self.runner.running

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.handler.handle(request)

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        return await self.handler.expect(request)

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings live: running tasks keep theirs, new attempts use the new ones."""
        self.config = ProxyConfig.from_settings(settings)
        self.limiter.reconfigure(settings)

    def tick(self) -> None:
        """Let time act on the adaptive limit."""
        self.limiter.tick()

    def stop_uploads(self) -> int:
        """End of a shutdown grace period: tasks still uploading get 503 shutting_down now."""
        return self.handler.stop_uploads()

    def stop_retries(self) -> list["asyncio.Task[web.StreamResponse]"]:
        """End of a shutdown grace period: tasks between two attempts get 503 now."""
        return self.runner.stop_retries()
