"""The aiohttp application: routes, shared objects under typed keys, resources with a lifetime."""

import hmac
import random
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from gatekeeper import __version__
from gatekeeper.answers import json_answer
from gatekeeper.clock import Clock, SystemClock, local_iso
from gatekeeper.gate import Gate
from gatekeeper.health import HealthProbe
from gatekeeper.metrics import create_registry
from gatekeeper.proxy import Proxy, ProxyConfig
from gatekeeper.settings import Settings
from gatekeeper.state import LiveState
from gatekeeper.stats import stats_document
from gatekeeper.upstream import create_session

__all__ = [
    "HEALTH",
    "PROXY",
    "REGISTRY",
    "SESSION",
    "SETTINGS",
    "STATE",
    "build_app",
]

SETTINGS = web.AppKey("settings", Settings)
PROXY = web.AppKey("proxy", Proxy)
STATE = web.AppKey("state", LiveState)
HEALTH = web.AppKey("health", HealthProbe)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REGISTRY = web.AppKey("registry", CollectorRegistry)

STATS_PATHS = ("/stats", "/api/recordings/stats/asr-concurrency")


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """Wire the gatekeeper together; `clock` and `rng` are injectable for tests."""
    clock = clock or SystemClock()
    app = web.Application(handler_args={"max_field_size": 65536})
    gate = Gate(limit=settings.max_concurrent, max_queue=settings.queue_limit)
    state = LiveState(gate, now=clock.monotonic)
    proxy = Proxy(
        ProxyConfig.from_settings(settings),
        gate=gate,
        state=state,
        clock=clock,
        rng=rng or random.Random(),
        session=lambda: app[SESSION],
    )
    app[SETTINGS] = settings
    app[STATE] = state
    app[PROXY] = proxy
    app[HEALTH] = HealthProbe(
        settings.upstream_url,
        interval=settings.health_interval,
        timeout=settings.health_timeout,
        clock=clock,
        path=settings.health_path,
        busy=lambda: gate.counts().active > 0,
        on_status=state.set_upstream,
    )
    app[REGISTRY] = create_registry(state.snapshot)
    started = time.time()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # One client session for the app's life, sized for every slot plus pass-through traffic.
        app[SESSION] = create_session(pool_size=max(100, 2 * settings.max_concurrent))
        yield
        await app[SESSION].close()

    async def health_ctx(app: web.Application) -> AsyncIterator[None]:
        app[HEALTH].start()
        yield
        await app[HEALTH].stop()

    app.cleanup_ctx.extend([session_ctx, health_ctx])

    async def stats(request: web.Request) -> web.Response:
        token = settings.stats_token
        if token is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token.get_secret_value()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return json_answer(
                    401,
                    {
                        "error": "unauthorized",
                        "detail": "send 'Authorization: Bearer <ASR_STATS_TOKEN>'",
                    },
                    headers={"WWW-Authenticate": 'Bearer realm="asr-gatekeeper"'},
                )
        snap = state.snapshot()
        return json_answer(
            200,
            stats_document(
                snap,
                extras={
                    "upstream_up": app[HEALTH].status.up,
                    "uptime_seconds": round(time.time() - started, 1),
                    "started_at": local_iso(started),
                    "version": __version__,
                    "settings": settings.public_dict(),
                },
            ),
        )

    async def health(request: web.Request) -> web.Response:
        status = app[HEALTH].status
        snap = state.snapshot()
        ok = status.up is True and not snap.gate.shutting_down
        upstream = {
            "url": settings.upstream_url,
            "state": status.state.value,
            "reachable": status.up,
            "checked_at": None if status.checked_at is None else local_iso(status.checked_at),
            "latency_seconds": None if status.latency is None else round(status.latency, 4),
            "error": status.error,
        }
        return json_answer(
            200 if ok else 503,
            {
                "status": "ok" if ok else "degraded",
                "upstream": upstream,
                "shutting_down": snap.gate.shutting_down,
                "active_tasks": snap.gate.active,
                "queued_tasks": snap.gate.queued,
            },
        )

    for path in STATS_PATHS:
        app.router.add_get(path, stats)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", make_aiohttp_handler(app[REGISTRY]))
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app
