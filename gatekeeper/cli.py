"""The command line: `gatekeeper serve`, the other commands wired in, and the help for them."""

import argparse
import asyncio
import sys
from collections.abc import Sequence

from gatekeeper import __version__
from gatekeeper.commands.check_config import add_check_config_arguments, run_check_config
from gatekeeper.commands.flags import (
    add_settings_arguments,
    print_error,
    print_settings_error,
    settings_loader,
)
from gatekeeper.commands.tune import add_tune_arguments, run_tune
from gatekeeper.settings import ENV_PREFIX, SettingsError
from gatekeeper.sim.cli import add_sim_arguments, run_sim

__all__ = ["main"]

_DESCRIPTION = """\
ASR Gatekeeper: a reverse proxy that keeps a self-hosted GPU Whisper server from running out
of video memory. It lets at most ASR_MAX_CONCURRENT transcriptions reach the server, queues the
next ones fairly, refuses beyond the queue with 503 and an honest Retry-After, and retries
out-of-memory failures with longer delays."""

_SERVE_EPILOG = f"""\
Every flag has an environment variable ({ENV_PREFIX}<FLAG_NAME>, e.g. --max-concurrent is
{ENV_PREFIX}MAX_CONCURRENT); a .env file in the working directory is read too. Flags win over the
environment. Only --upstream-url / {ENV_PREFIX}UPSTREAM_URL is required.

example:
  gatekeeper serve --upstream-url http://whisper:9000 --max-concurrent 2"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatekeeper",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gatekeeper in front of a Whisper server",
        description="Run the gatekeeper in front of a Whisper server.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_arguments(serve)
    check = commands.add_parser(
        "check-config",
        help="print the worst-case time of one task; check nginx/proxy timeouts against it",
        description="Print how long one task may take in the worst case with the current "
        "settings, and check that the proxy in front waits at least that long.",
    )
    add_check_config_arguments(check)
    tune = commands.add_parser(
        "tune",
        help="stress-test a Whisper server at concurrency 1, 2, 3, ... and recommend a limit",
        description="The seed guide's stress test as a command: step the concurrency against a "
        "Whisper server, measure OOMs, latency and throughput, and recommend ASR_MAX_CONCURRENT.",
    )
    add_tune_arguments(tune)
    sim = commands.add_parser(
        "sim",
        help="run the built-in Whisper simulator (a stand-in GPU server that really answers OOM)",
        description="Run the Whisper simulator: a stand-in GPU Whisper server with a video-memory "
        "model, for demos, tests and benchmarks.",
    )
    add_sim_arguments(sim)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from gatekeeper.logs import configure_logging
    from gatekeeper.server import EventLoopMissing, loop_factory, serve

    load = settings_loader(args)  # called again on SIGHUP: the same flags, a fresh environment
    try:
        settings = load()
    except SettingsError as exc:
        return print_settings_error(exc)
    try:
        factory = loop_factory(settings.event_loop)
    except EventLoopMissing as exc:
        return print_error("gatekeeper", exc)
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    with asyncio.Runner(loop_factory=factory) as runner:
        status: int = runner.run(serve(settings, load))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gatekeeper` command; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return run_check_config(args)
    if args.command == "tune":
        return run_tune(args)
    return run_sim(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
