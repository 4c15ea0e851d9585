"""`gatekeeper sim`: run the Whisper simulator in the foreground until Ctrl-C or SIGTERM.

The flags are the `SimConfig` knobs under operator-friendly names; the main CLI adds them to
its `sim` sub-command with `add_sim_arguments` and calls `run_sim`.
"""

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import fields

from .errors import ErrorStyle
from .server import OnDisconnect, SimConfig, Simulator

__all__ = ["add_sim_arguments", "config_from_args", "describe", "main", "run_sim"]

_DEFAULTS = SimConfig()


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags (all optional; defaults are the 24 GiB card story)."""
    d = _DEFAULTS
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=9000,
        help="port to listen on, 0 for any free port (default: %(default)s, "
        "whisper-asr-webservice's port)",
    )
    card = parser.add_argument_group("GPU memory model")
    card.add_argument(
        "--total-gib",
        type=float,
        default=d.total_gib,
        help="memory on the simulated card in GiB (default: %(default)s)",
    )
    card.add_argument(
        "--reserved-gib",
        type=float,
        default=d.reserved_gib,
        help="GiB held for the server's whole life: model weights and CUDA context "
        "(default: %(default)s)",
    )
    card.add_argument(
        "--task-base-gib",
        type=float,
        default=d.task_base_gib,
        help="GiB every task needs at its peak, however short its audio (default: %(default)s)",
    )
    card.add_argument(
        "--task-gib-per-minute",
        type=float,
        default=d.task_gib_per_minute,
        help="extra GiB a task needs per minute of audio (default: %(default)s); a task that "
        "does not fit answers out-of-memory at once",
    )
    card.add_argument(
        "--release-delay",
        type=float,
        default=d.release_delay,
        help="seconds a finished task keeps its memory, like a cache that is not freed at "
        "once (default: %(default)s)",
    )
    speed = parser.add_argument_group("processing speed")
    speed.add_argument(
        "--rtf",
        type=float,
        default=d.rtf,
        help="GPU seconds per second of audio with the GPU to itself; 0.1 means a 10-minute "
        "file takes 1 minute (default: %(default)s)",
    )
    speed.add_argument(
        "--parallel-gain",
        type=float,
        default=d.parallel_gain,
        help="extra total throughput each additional concurrent task brings; concurrent "
        "tasks are each slower but together faster (default: %(default)s)",
    )
    speed.add_argument(
        "--max-speedup",
        type=float,
        default=d.max_speedup,
        help="cap on total throughput relative to one task alone (default: %(default)s)",
    )
    speed.add_argument(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help="run N times faster than the story: processing, restart and release delay "
        "(default: %(default)s)",
    )
    faults = parser.add_argument_group("failures")
    faults.add_argument(
        "--error-style",
        choices=[style.value for style in ErrorStyle],
        default=d.error_style.value,
        help="how errors look: pytorch (traceback), fastapi ({detail}), bare (just 'Internal "
        "Server Error', as whisper-asr-webservice), ctranslate2, whispercpp ({error}), openai "
        "({error: {message}}) (default: %(default)s)",
    )
    faults.add_argument(
        "--crash-on-oom",
        action="store_true",
        help="on out-of-memory reset every connection and refuse new ones for "
        "--restart-seconds, like whisper.cpp aborting under a restarting container",
    )
    faults.add_argument(
        "--restart-seconds",
        type=float,
        default=d.restart_seconds,
        help="how long a crashed simulator refuses connections (default: %(default)s)",
    )
    faults.add_argument(
        "--stall-when-busy",
        action="store_true",
        help="make /health, /docs and / wait while a task runs, as whisper-asr-webservice does",
    )
    faults.add_argument(
        "--on-disconnect",
        choices=[choice.value for choice in OnDisconnect],
        default=d.on_disconnect.value,
        help="when a client hangs up mid-task: 'continue' keeps transcribing (memory, GPU share "
        "and the active count stay taken) until the task would have finished, like a "
        "FastAPI/uvicorn server; 'stop' drops the task at once, like whisper.cpp's server "
        "(default: %(default)s)",
    )
    misc = parser.add_argument_group("input and randomness")
    misc.add_argument(
        "--byte-rate",
        type=float,
        default=d.byte_rate,
        help="bytes per second assumed to estimate the duration of an upload whose audio "
        "length cannot be read (default: %(default)s, about a 128 kbit/s mp3)",
    )
    misc.add_argument(
        "--seed", type=int, default=None, help="seed for the random jitter (default: none)"
    )
    misc.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request (off by default: task lines say enough)",
    )
    misc.add_argument(
        "--jitter",
        type=float,
        default=d.jitter,
        help="vary each task's processing time by up to this fraction, e.g. 0.05 for "
        "±5%% (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build the `SimConfig` from parsed flags (flags not given keep the defaults)."""
    known = {f.name for f in fields(SimConfig)}
    values = {name: value for name, value in vars(args).items() if name in known}
    return SimConfig(**values)


def describe(config: SimConfig) -> str:
    """One line for operators: the memory model in the story's words."""
    return (
        f"{config.total_gib:g} GiB card, {config.reserved_gib:g} GiB reserved, "
        f"a task needs {config.task_base_gib:.1f} GiB + {config.task_gib_per_minute:.1f} GiB "
        f"per audio minute; rtf {config.rtf:g}, errors in {config.error_style.value} style"
        + (", crashes on OOM" if config.crash_on_oom else "")
        + (", stops a task whose client left" if config.on_disconnect is OnDisconnect.STOP else "")
        + (f", time ×{config.time_scale:g}" if config.time_scale != 1 else "")
    )


def run_sim(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT or SIGTERM; returns the exit status (0, or 2 on bad flags)."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"gatekeeper sim: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not getattr(args, "access_log", False):
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except OSError as exc:
        print(f"gatekeeper sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    simulator = Simulator(config, access_log=logging.getLogger("aiohttp.access"))
    await simulator.start(host, port)
    try:
        print(f"Whisper simulator listening on {simulator.url} — {describe(config)}", flush=True)
        await stop.wait()
    finally:
        await simulator.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    """``python -m gatekeeper.sim.cli``: the simulator without the main CLI."""
    parser = argparse.ArgumentParser(
        prog="gatekeeper sim",
        description="Run a simulated GPU Whisper server with a memory model that answers OOM.",
    )
    add_sim_arguments(parser)
    return run_sim(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
