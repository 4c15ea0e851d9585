"""The aiohttp application: routes, shared objects under typed keys, resources with a lifetime."""

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gatekeeper.clock import Clock, SystemClock
from gatekeeper.cluster.coordinator import Coordinator
from gatekeeper.cluster.leases import LeaseConfig
from gatekeeper.cluster.sharing import share_learning
from gatekeeper.control import Controller
from gatekeeper.endpoints import OwnEndpoints
from gatekeeper.health import HealthProbe, HealthProbes
from gatekeeper.metrics import create_registry
from gatekeeper.middlewares import refuse_transfer_codings
from gatekeeper.proxy import Proxy
from gatekeeper.settings import Settings
from gatekeeper.state import LiveState
from gatekeeper.upstream import create_session

__all__ = [
    "CONTROL",
    "COORDINATOR",
    "HEALTH",
    "PROXY",
    "REGISTRY",
    "SESSION",
    "STATE",
    "build_app",
]

PROXY = web.AppKey("proxy", Proxy)
STATE = web.AppKey("state", LiveState)
HEALTH = web.AppKey("health", HealthProbes)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REGISTRY = web.AppKey("registry", CollectorRegistry)
CONTROL = web.AppKey("control", Controller)
COORDINATOR = web.AppKey("coordinator", Coordinator)  # only with ASR_REDIS_URL

_ADAPTIVE_TICK = 5.0


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """Wire the gatekeeper together; `clock` and `rng` are injectable for tests."""
    clock = clock or SystemClock()
    app = web.Application(
        handler_args={"max_field_size": 65536}, middlewares=[refuse_transfer_codings]
    )
    proxy = Proxy(
        settings,
        clock=clock,
        rng=rng or random.Random(),
        session=lambda: app[SESSION],
        suspect=lambda server: app[HEALTH].check_soon(server),
    )
    app[PROXY] = proxy
    app[STATE] = proxy.state
    app[CONTROL] = Controller(settings, on_change=proxy.reconfigure)
    app[HEALTH] = _probes(settings, proxy, clock)
    coordinator = _coordinator(settings, proxy, clock, rng)
    app[REGISTRY] = create_registry(
        proxy.state.snapshot, cluster=None if coordinator is None else coordinator.snapshot
    )
    lifetimes = [_session_ctx(settings), _health_ctx, _adaptive_ctx]
    if coordinator is not None:
        share_learning(coordinator, proxy.limiter, proxy.state, clock)
        app[COORDINATOR] = coordinator
        lifetimes.append(_cluster_ctx)  # closed after the work upstream ended (its releases)
    app.cleanup_ctx.extend([*lifetimes, _upstream_work_ctx])
    own = OwnEndpoints(
        settings,
        state=proxy.state,
        gate=proxy.gate,
        control=app[CONTROL],
        probe=app[HEALTH],
        registry=app[REGISTRY],
        coordinator=coordinator,
    )
    own.add_routes(app.router)

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        # Every other request goes to the Whisper server, except other spellings of own paths.
        return own.elsewhere(request) or await proxy.handle(request)

    app.router.add_route("*", "/{tail:.*}", elsewhere, expect_handler=proxy.expect)
    return app


def _probes(settings: Settings, proxy: Proxy, clock: Clock) -> HealthProbes:
    """One background health probe per Whisper server."""

    def probe(server: int, url: str) -> HealthProbe:
        return HealthProbe(
            url,
            interval=settings.health_interval,
            timeout=settings.health_timeout,
            clock=clock,
            path=settings.health_path,
            busy=lambda: proxy.gate.counts().servers[server].active > 0,
            on_status=lambda health: proxy.upstream_checked(server, health),
        )

    return HealthProbes([probe(i, url) for i, url in enumerate(settings.upstream_urls)])


def _coordinator(
    settings: Settings, proxy: Proxy, clock: Clock, rng: random.Random | None
) -> Coordinator | None:
    """With ASR_REDIS_URL: the permits of every slot come from leases the cluster shares."""
    if settings.redis_url is None:
        return None
    config = LeaseConfig(
        settings.redis_url.get_secret_value(),
        cluster=settings.cluster,
        lease_seconds=settings.redis_lease,
        timeout_seconds=settings.redis_timeout,
        poll_seconds=min(1.0, settings.redis_lease / 3),
    )
    return Coordinator(config, proxy.gate, settings.upstream_names, clock=clock, rng=rng)


Lifetime = Callable[[web.Application], AsyncIterator[None]]


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    coordinator = app[COORDINATOR]
    await coordinator.start()
    yield
    await coordinator.aclose()


def _session_ctx(settings: Settings) -> Lifetime:
    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # One client session for the app's life, sized for every slot plus pass-through traffic.
        app[SESSION] = create_session(pool_size=max(100, 2 * settings.total_limit))
        yield
        await app[SESSION].close()

    return session_ctx


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    app[HEALTH].start()
    yield
    await app[HEALTH].stop()


async def _adaptive_ctx(app: web.Application) -> AsyncIterator[None]:
    # Time alone can raise an adaptive limit (a stretch grown stable, a faded ceiling).
    proxy = app[PROXY]

    async def ticker() -> None:
        while True:  # on the injected clock: a fake one wakes it as tests advance time
            await proxy.clock.wait_until(proxy.clock.monotonic() + _ADAPTIVE_TICK)
            proxy.tick()

    task = asyncio.create_task(ticker(), name="adaptive-tick")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _upstream_work_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    # Before the session closes: attempt loops and holds of timed-out attempts still running
    # (a test that ends early; `serve` has drained already) end here, not later.
    leftover = [task for task in app[PROXY].runners if not task.done()]
    for task in leftover:
        task.cancel()
    if leftover:
        await asyncio.wait(leftover)
