"""The gatekeeper's own endpoints: /stats, /health, /metrics and /admin/config.

They are answered here and never forwarded, in any spelling (`/STATS`, `/stats/`): passed on, a
request would carry a token meant for the gatekeeper to the Whisper server.
"""

import hmac
import json
import time
from collections.abc import Awaitable, Callable, Container

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from pydantic import SecretStr

from gatekeeper import __version__
from gatekeeper.answers import json_answer, own_path_elsewhere
from gatekeeper.clock import local_iso
from gatekeeper.cluster.coordinator import Coordinator
from gatekeeper.control import RELOADABLE, Controller
from gatekeeper.gate import Gate
from gatekeeper.health import HealthProbes
from gatekeeper.settings import Settings, SettingsError
from gatekeeper.state import LiveState
from gatekeeper.stats import stats_document

__all__ = ["STATS_PATHS", "OwnEndpoints"]

STATS_PATHS = ("/stats", "/api/recordings/stats/asr-concurrency")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OwnEndpoints:
    """The handlers of the gatekeeper's own paths, and the guard that keeps them its own."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: LiveState,
        gate: Gate,
        control: Controller,
        probe: HealthProbes,
        registry: CollectorRegistry,
        coordinator: Coordinator | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._settings = settings
        self._state = state
        self._gate = gate
        self._control = control
        self._probe = probe
        self._registry = registry
        self._started = time.time()
        self._own: dict[str, tuple[str, ...]] = {}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Route the own paths (with their tokens); remember them for `elsewhere`."""
        settings = self._settings
        stats = _bearer_guard(settings.stats_token, "asr-gatekeeper stats", self.stats)
        for path in STATS_PATHS:
            router.add_get(path, stats)
        router.add_get("/health", self.health)
        router.add_get("/metrics", make_aiohttp_handler(self._registry))
        if settings.admin_token is None:
            router.add_route("*", "/admin/config", self.admin_absent)
        else:
            realm = "asr-gatekeeper admin"
            router.add_get(
                "/admin/config", _bearer_guard(settings.admin_token, realm, self.admin_get)
            )
            router.add_patch(
                "/admin/config", _bearer_guard(settings.admin_token, realm, self.admin_patch)
            )
        methods: dict[str, set[str]] = {}
        for route in router.routes():
            if route.resource is not None:
                methods.setdefault(route.resource.canonical, set()).add(route.method)
        self._own = {path: tuple(sorted(allowed)) for path, allowed in methods.items()}

    def elsewhere(self, request: web.Request) -> web.Response | None:
        """404/405 naming the right path for another spelling of an own path; None otherwise."""
        own = _own_path(request.path, self._own)
        if own is None:
            return None
        return own_path_elsewhere(own, allowed=self._own[own], exact=own == request.path)

    async def stats(self, request: web.Request) -> web.StreamResponse:
        extras = {
            "uptime_seconds": round(time.time() - self._started, 1),
            "started_at": local_iso(self._started),
            "version": __version__,
            "settings": self._control.settings.public_dict(),
        }
        coordinator = self._coordinator
        extras["cluster"] = None if coordinator is None else await coordinator.stats()
        return json_answer(200, stats_document(self._state.snapshot(), extras=extras))

    async def health(self, request: web.Request) -> web.StreamResponse:
        """ok while at least one Whisper server is up; each server listed."""
        counts = self._gate.counts()  # cheap: /health must answer fast even under a flood
        names, urls = self._settings.upstream_names, self._settings.upstream_urls
        upstreams = []
        for i, probe in enumerate(self._probe.probes):
            status = probe.status
            upstreams.append(
                {
                    "name": names[i],
                    "url": urls[i],
                    "state": status.state.value,
                    "reachable": status.up,
                    "checked_at": (
                        None if status.checked_at is None else local_iso(status.checked_at)
                    ),
                    "latency_seconds": (
                        None if status.latency is None else round(status.latency, 4)
                    ),
                    "error": status.error,
                }
            )
        up = any(entry["reachable"] is True for entry in upstreams)
        ok = up and not counts.shutting_down and self._gate.coordinated
        doc: dict[str, object] = {"status": "ok" if ok else "degraded"}
        if len(upstreams) == 1:  # the single-server shape, kept as it was
            doc["upstream"] = {k: v for k, v in upstreams[0].items() if k != "name"}
        doc.update(
            {
                "upstreams": upstreams,
                "upstreams_up": sum(entry["reachable"] is True for entry in upstreams),
                "shutting_down": counts.shutting_down,
                "active_tasks": counts.active,
                "queued_tasks": counts.queued,
            }
        )
        coordinator = self._coordinator
        if coordinator is not None:  # replicas: whether the cluster's slots can be proven
            doc["cluster"] = {
                "name": coordinator.config.cluster,
                "replica": coordinator.config.replica,
                "redis": "up" if self._gate.coordinated else "down",
            }
        return json_answer(200 if ok else 503, doc)

    async def admin_get(self, request: web.Request) -> web.StreamResponse:
        return json_answer(
            200,
            {"settings": self._control.settings.public_dict(), "reloadable": sorted(RELOADABLE)},
        )

    async def admin_patch(self, request: web.Request) -> web.StreamResponse:
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
            changes = self._control.apply(patch, who=request.remote or "unknown", via="admin_api")
        except SettingsError as exc:
            return json_answer(400, {"error": "invalid settings", "problems": exc.lines})
        return json_answer(
            200,
            {
                "changed": {c.name: {"old": c.old, "new": c.new} for c in changes},
                "settings": self._control.settings.public_dict(),
            },
        )

    async def admin_absent(self, request: web.Request) -> web.StreamResponse:
        return json_answer(
            404,
            {"error": "not found", "detail": "live configuration is off: set ASR_ADMIN_TOKEN"},
        )


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
