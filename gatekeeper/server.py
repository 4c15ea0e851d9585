"""Running the gatekeeper as a process: listen, serve, and drain on SIGTERM/SIGINT.

Shutdown is `drain.drain` (stop admitting, let the work finish for up to ASR_SHUTDOWN_GRACE
seconds, then answer or stop what is left), then the listener closes and the process exits 0.
A second signal skips the rest of the grace period.
"""

import asyncio
import contextlib
import json
import resource
import signal
from collections.abc import Callable

from aiohttp import web

from gatekeeper.app import CONTROL, PROXY, build_app
from gatekeeper.connections import GatekeeperRunner
from gatekeeper.drain import FINAL_FLUSH, DrainReport, drain
from gatekeeper.logs import LOG_PREFIX, Event, log_event, logger
from gatekeeper.settings import Settings, SettingsError

__all__ = ["EventLoopMissing", "loop_factory", "serve"]


class EventLoopMissing(Exception):
    """ASR_EVENT_LOOP asks for an event loop that is not installed."""


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `serve` runs on (None: Python's own), from ASR_EVENT_LOOP."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # optional: Python's own loop does the same job, a little slower
    except ImportError:
        if choice == "uvloop":
            raise EventLoopMissing(
                "ASR_EVENT_LOOP=uvloop, but uvloop is not installed: install it "
                "(pip install uvloop) or set ASR_EVENT_LOOP=auto"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _loop_name() -> str:
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def _raise_open_file_limit() -> None:
    """Use the hard limit for open files: every queued upload holds a socket and maybe a file.

    Like nginx's worker_rlimit_nofile; thousands of idle or queued clients must not starve
    /health of descriptors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Signals:
    """SIGTERM/SIGINT ask for a drain (a second one cuts the grace short); SIGHUP reloads."""

    def __init__(
        self, app: web.Application, settings: Settings, reload: Callable[[], Settings] | None
    ) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self._app = app
        self._settings = settings
        self._reload = reload

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    def _on_stop(self, signame: str) -> None:
        if self.stop.is_set():
            self.hurry.set()
            log_event(Event.DRAINING_CUT, signal=signame)
        else:
            self.stop.set()
            log_event(Event.DRAINING, signal=signame, grace=self._settings.shutdown_grace)

    def _on_hangup(self) -> None:
        if self._reload is None:
            return
        try:
            self._app[CONTROL].reload(self._reload(), via="sighup")
        except SettingsError as exc:
            for line in exc.lines:
                logger.error(
                    "%s 配置重载失败，保留当前配置 problem=%s", LOG_PREFIX, json.dumps(line)
                )


def _runner(app: web.Application, settings: Settings) -> GatekeeperRunner:
    return GatekeeperRunner(
        app,
        header_timeout=settings.header_timeout,  # slow request heads (gatekeeper/connections.py)
        handler_cancellation=True,  # how a client that left is noticed (see handler.py)
        # A gzip-encoded upload goes upstream exactly as sent, still labelled gzip, not
        # inflated under a header that still says gzip (bytes in = bytes out).
        auto_decompress=False,
        shutdown_timeout=FINAL_FLUSH,  # aiohttp gives handlers this to write their last answers
        access_log_format='%a "%r" %s %b %Tfs "%{X-Request-ID}o"',
    )


def _log_serving(settings: Settings) -> None:
    log_event(
        Event.SERVING,
        listen=f"http://{settings.host}:{settings.port}",
        upstream=settings.upstream_url,
        max_concurrent=",".join(map(str, settings.limits)),
        max_queue=settings.queue_limit,
        event_loop=_loop_name(),
    )
    if settings.stats_token is None:
        logger.warning(
            "%s ASR_STATS_TOKEN is not set: /stats is open to anyone who can reach port %d; "
            "set a token or restrict /stats in nginx",
            LOG_PREFIX,
            settings.port,
        )


async def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """Serve until a signal, drain, and return the exit status.

    `reload` re-reads the settings (environment and env file, flags still winning) on SIGHUP.
    """
    _raise_open_file_limit()
    app = build_app(settings)
    runner = _runner(app, settings)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    proxy = app[PROXY]
    signals = _Signals(app, settings, reload)
    signals.install()
    _log_serving(settings)
    report = DrainReport(refused_waiting=0, stopped_running=0)
    try:
        await signals.stop.wait()
        report = await drain(proxy, grace=settings.shutdown_grace, hurry=signals.hurry)
    finally:
        signals.remove()
        await runner.cleanup()
    # Only now is every answer out (the cleanup waits for the handlers still writing theirs):
    # the last line says so, with what was left.
    counts = proxy.gate.counts()
    log_event(
        Event.STOPPED,
        refused_waiting=report.refused_waiting,
        stopped_running=report.stopped_running,
        active=counts.active,
        queued=counts.queued,
    )
    return 0
