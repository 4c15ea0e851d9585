"""The aiohttp application: routes, shared objects under typed keys, resources with a lifetime."""

import asyncio
import contextlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from pydantic import SecretStr

from gatekeeper import __version__
from gatekeeper.answers import json_answer, own_path_elsewhere
from gatekeeper.clock import Clock, SystemClock, local_iso
from gatekeeper.control import RELOADABLE, Controller
from gatekeeper.health import HealthProbe
from gatekeeper.metrics import create_registry
from gatekeeper.middlewares import refuse_transfer_codings
from gatekeeper.proxy import Proxy
from gatekeeper.settings import Settings, SettingsError
from gatekeeper.state import LiveState
from gatekeeper.stats import stats_document
from gatekeeper.upstream import create_session

__all__ = [
    "CONTROL",
    "HEALTH",
    "PROXY",
    "REGISTRY",
    "SESSION",
    "STATE",
    "build_app",
]

PROXY = web.AppKey("proxy", Proxy)
STATE = web.AppKey("state", LiveState)
HEALTH = web.AppKey("health", HealthProbe)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REGISTRY = web.AppKey("registry", CollectorRegistry)
CONTROL = web.AppKey("control", Controller)

STATS_PATHS = ("/stats", "/api/recordings/stats/asr-concurrency")
_ADAPTIVE_TICK = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bearer_guard(token: SecretStr | None, realm: str, handler: Handler) -> Handler:
    """Wrap `handler` so it needs `Authorization: Bearer <token>` (compared in constant time).

    The scheme's letter case does not matter (`bearer` is as good: RFC 9110 §11.1).
    """
    if token is None:
        return handler
    expected = token.get_secret_value().encode()

    async def guarded(request: web.Request) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Undecodable header bytes arrive as surrogates: they compare unequal, never raise.
        given_bytes = given.lstrip(" ").encode("utf-8", "surrogateescape")
        matches = hmac.compare_digest(given_bytes, expected)
        if not (matches and scheme.lower() == "bearer"):
            return json_answer(
                401,
                {"error": "unauthorized", "detail": "send 'Authorization: Bearer <token>'"},
                headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
            )
        return await handler(request)

    return guarded


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
    proxy = Proxy(settings, clock=clock, rng=rng or random.Random(), session=lambda: app[SESSION])
    gate, state = proxy.gate, proxy.state
    control = Controller(settings, on_change=proxy.reconfigure)
    app[STATE] = state
    app[PROXY] = proxy
    app[CONTROL] = control
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

    async def adaptive_ctx(app: web.Application) -> AsyncIterator[None]:
        # Time alone can raise an adaptive limit (a stretch grown stable, a faded ceiling).
        async def ticker() -> None:
            while True:
                await asyncio.sleep(_ADAPTIVE_TICK)
                proxy.tick()

        task = asyncio.create_task(ticker(), name="adaptive-tick")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def upstream_work_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        # Before the session closes: attempt loops and holds of timed-out attempts still
        # running (a test that ends early; `serve` has drained already) end here, not later.
        leftover = [task for task in proxy.runners if not task.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover)

    app.cleanup_ctx.extend([session_ctx, health_ctx, adaptive_ctx, upstream_work_ctx])

    async def stats(request: web.Request) -> web.StreamResponse:
        extras = {
            "uptime_seconds": round(time.time() - started, 1),
            "started_at": local_iso(started),
            "version": __version__,
            "settings": control.settings.public_dict(),
        }
        return json_answer(200, stats_document(state.snapshot(), extras=extras))

    async def health(request: web.Request) -> web.StreamResponse:
        status = app[HEALTH].status
        counts = gate.counts()  # cheap: /health must answer fast even under a flood
        ok = status.up is True and not counts.shutting_down
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
                "shutting_down": counts.shutting_down,
                "active_tasks": counts.active,
                "queued_tasks": counts.queued,
            },
        )

    async def admin_get(request: web.Request) -> web.StreamResponse:
        return json_answer(
            200,
            {"settings": control.settings.public_dict(), "reloadable": sorted(RELOADABLE)},
        )

    async def admin_patch(request: web.Request) -> web.StreamResponse:
        try:
            patch = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            patch = None
        if not isinstance(patch, dict):
            return json_answer(
                400,
                {
                    "error": "bad request",
                    "detail": 'send a JSON object, e.g. {"max_concurrent": 2}',
                },
            )
        try:
            changes = control.apply(patch, who=request.remote or "unknown", via="admin_api")
        except SettingsError as exc:
            return json_answer(400, {"error": "invalid settings", "problems": exc.lines})
        return json_answer(
            200,
            {
                "changed": {c.name: {"old": c.old, "new": c.new} for c in changes},
                "settings": control.settings.public_dict(),
            },
        )

    async def admin_absent(request: web.Request) -> web.StreamResponse:
        return json_answer(
            404,
            {"error": "not found", "detail": "live configuration is off: set ASR_ADMIN_TOKEN"},
        )

    stats_handler = _bearer_guard(settings.stats_token, "asr-gatekeeper stats", stats)
    for path in STATS_PATHS:
        app.router.add_get(path, stats_handler)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", make_aiohttp_handler(app[REGISTRY]))
    if settings.admin_token is None:
        app.router.add_route("*", "/admin/config", admin_absent)
    else:
        app.router.add_get(
            "/admin/config", _bearer_guard(settings.admin_token, "asr-gatekeeper admin", admin_get)
        )
        app.router.add_patch(
            "/admin/config",
            _bearer_guard(settings.admin_token, "asr-gatekeeper admin", admin_patch),
        )
    # Every other request goes to the Whisper server, except other spellings of the paths above.
    own_methods: dict[str, set[str]] = {}
    for route in app.router.routes():
        if route.resource is not None:
            own_methods.setdefault(route.resource.canonical, set()).add(route.method)
    own_allowed = {path: tuple(sorted(methods)) for path, methods in own_methods.items()}

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        own = _own_path(request.path, own_allowed)
        if own is not None:
            exact = own == request.path
            return own_path_elsewhere(own, allowed=own_allowed[own], exact=exact)
        return await proxy.handle(request)

    app.router.add_route("*", "/{tail:.*}", elsewhere, expect_handler=proxy.expect)
    return app


def _own_path(path: str, own: Container[str]) -> str | None:
    """The gatekeeper's own path that `path` spells loosely, if any.

    Letter case, trailing or doubled slashes and dot segments are ignored (`/STATS/`, `//stats`,
    `/x/../stats`): passed on, such a request would carry a token meant for the gatekeeper to the
    Whisper server.
    """
    parts: list[str] = []
    for part in path.lower().split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    loose = "/" + "/".join(parts)
    return loose if loose in own else None
