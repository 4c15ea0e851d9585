"""Shared fixtures: a fake upstream, and gatekeepers started in process on real sockets."""

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from gatekeeper.app import build_app
from gatekeeper.clock import Clock
from gatekeeper.connections import GatekeeperRunner
from gatekeeper.settings import load_settings
from gatekeeper.sim import SimConfig, Simulator
from tests.fakes import FakeUpstream

GatekeeperFactory = Callable[..., Awaitable[tuple[str, web.Application]]]
StartSim = Callable[..., Awaitable[Simulator]]


class _GatekeeperTestServer(TestServer):
    """aiohttp's TestServer with the gatekeeper's runner (the request-head deadline)."""

    def __init__(self, app: web.Application, *, header_timeout: float) -> None:
        super().__init__(app)
        self._header_timeout = header_timeout

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatekeeperRunner(self.app, header_timeout=self._header_timeout, **kwargs)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ASR_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("ASR_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_gatekeeper() -> AsyncIterator[GatekeeperFactory]:
    """Start gatekeepers (aiohttp TestServer: real socket, handler cancellation on)."""
    servers: list[TestServer] = []

    async def start(
        upstream_url: str, *, clock: Clock | None = None, seed: int = 1, **settings: Any
    ) -> tuple[str, web.Application]:
        config = load_settings(
            {"upstream_url": upstream_url, "health_interval": 0.05, **settings}, env_file=None
        )
        app = build_app(config, clock=clock, rng=random.Random(seed))
        # As `gatekeeper serve` runs it (gatekeeper/server.py); TestServer turns handler
        # cancellation on itself.
        server = _GatekeeperTestServer(app, header_timeout=config.header_timeout)
        await server.start_server(auto_decompress=False)
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), app

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def sim_time_scale() -> float:
    """How many times faster than real time `start_sim` runs (a module may override this)."""
    return 1.0


@pytest.fixture
async def start_sim(sim_time_scale: float) -> AsyncIterator[StartSim]:
    """Start simulators on free ports with config overrides; stop them all afterwards."""
    started: list[Simulator] = []

    async def start(**overrides: Any) -> Simulator:
        sim = Simulator(SimConfig(**{"time_scale": sim_time_scale, **overrides}))
        await sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()
