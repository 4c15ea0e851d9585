"""``python -m bench``: options, the run, and where the results go."""

import argparse
import asyncio
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.config import FULL, QUICK
from bench.procs import REPO, Procs, ToolMissing, find_tool
from bench.scenarios import goodput, memory, overhead, overload, pool, replicas, uploads
from bench.scenarios.common import Ctx

__all__ = ["SCENARIOS", "main"]

SCENARIOS: dict[str, Callable[[Ctx], Awaitable[dict[str, Any]]]] = {
    "overhead": overhead.run,
    "uploads": uploads.run,
    "overload": overload.run,
    "goodput": goodput.run,
    "pool": pool.run,
    "memory": memory.run,
    "replicas": replicas.run,
}

_DESCRIPTION = """\
Benchmark the gatekeeper against the references a user would pick instead, side by side in
one run: the client talking to the upstream directly (the floor), HAProxy with the equivalent
admission config (maxconn, maxqueue, timeout queue), nginx as a plain proxy_pass, and the
gatekeeper (as shipped, on uvloop, and on Python's own asyncio loop). Every process runs on
free 127.0.0.1 ports.

scenarios:
  overhead  small POST to /asr on a ~1 ms upstream: added latency p50/p99, requests/s (wrk)
  uploads   100 MB multipart uploads: MB/s through each proxy; gatekeeper peak RSS with
            20 uploads queued (10 MB and 100 MB: it must stay flat)
  overload  5,000 tasks at limit 2, queue 20: refusal latency, exact admitted count,
            /metrics and /health p99 during the burst
  goodput   the Whisper simulator under a seeded overloading mix: audio-minutes per minute,
            OOM rate, queue wait, refusals for HAProxy and the gatekeeper at limits 1-4,
            and with no admission control
  pool      a heterogeneous pool (two 24 GiB cards, one 12 GiB), the same mix scaled to it:
            HAProxy leastconn with per-server maxconn/maxqueue, the gatekeeper over the pool
            (fixed per-card limits, adaptive), and the ceiling (each card alone, summed)
  memory    admission by GPU memory (#16) on both cards, real WAV uploads: the gatekeeper
            with the true memory figures and learning them from the seed's, against a
            clairvoyant oracle (computed in-process on the simulator's GPU model), today's
            adaptive count, HAProxy and fixed limits; short files' queue wait, backfill bound
  replicas  several gatekeepers sharing each server's limit through Redis (#17), behind nginx
            on the fast upstream: the latency coordination adds per task (p50/p99; each
            replica's acquire histogram; a Redis PING as floor) and the refusals of a flood at
            limit 2, queue 20 a replica, for 1 and 3 replicas with and without Redis; the
            upstream's count in flight checks the shared limit

Writes RESULTS.md (tables, machine description, each target beside its figure) and
results.json. A run of some scenarios into a directory that already holds results of the
same mode replaces only those scenarios' results (and their sections); the rest is kept.
Needs the Debian packages haproxy, nginx and wrk (and py-spy for --profile); the replicas
scenario also redis-server (./scripts/setup --test-tools installs them all).
The full run takes about 40 minutes; --quick (for CI) under 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and short runs (under two minutes) to keep the harness working; "
        "the figures are not meaningful",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        metavar="LIST",
        help="comma-separated scenarios to run (default: all: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where RESULTS.md and results.json go (default: bench/results, or "
        "bench/results/quick with --quick)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the gatekeeper with py-spy during saturation and the burst, in extra "
        "runs that do not touch the figures; summaries go into the results, raw stacks to "
        "DIR/profiles/",
    )
    parser.add_argument(
        "--no-asyncio",
        action="store_true",
        help="skip the gatekeeper-on-Python's-own-loop reference (ASR_EVENT_LOOP=asyncio)",
    )
    parser.add_argument(
        "--gatekeeper-path",
        metavar="DIR",
        default=None,
        help="run the gatekeeper from this source tree instead (a checkout with a patch, to "
        "measure it against the same references); a tree older than ASR_EVENT_LOOP needs "
        "--no-asyncio, and runs its own default loop",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the goodput workload (default: 1)"
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary directory with every process's log and config",
    )
    return parser


def _check_tools(profile: bool, names: Sequence[str]) -> list[str]:
    missing = []
    extra = (*(("py-spy",) if profile else ()), *(("redis-server",) if "replicas" in names else ()))
    for tool in ("haproxy", "nginx", "wrk", *extra):
        try:
            find_tool(tool)
        except ToolMissing as exc:
            missing.append(str(exc))
    return missing


async def _run(ctx: Ctx, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        began = time.monotonic()
        try:
            results[name] = await SCENARIOS[name](ctx)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            ctx.say(f"{name}: FAILED\n{traceback.format_exc()}")
        finally:
            await ctx.procs.aclose()
        ctx.say(f"{name}: done in {time.monotonic() - began:.0f} s")
    return results, errors


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        print(f"bench: unknown scenario(s) {unknown}; pick from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    missing = _check_tools(args.profile, names)
    if missing:
        for line in missing:
            print(f"bench: {line}", file=sys.stderr)
        return 2
    cfg = QUICK if args.quick else FULL
    out: Path = args.out or (REPO / "bench" / "results" / ("quick" if args.quick else ""))
    workdir = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-"))
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    notes = [
        "Shared machine: other engineers run builds and tests on the same 2 cores (the load "
        "average at start and end is above); every reference was measured in the same rotating "
        "rounds, so the ratios hold even where the absolute figures wander.",
        "Client and load generator: wrk (-t1) for requests/s; a minimal asyncio HTTP/1.1 "
        "client (bench/httpclient.py) for timed requests, uploads and the burst; the fast "
        "upstream is a raw asyncio server (uvloop when installed) in its own process.",
    ]
    if importlib.util.find_spec("uvloop") is None:
        notes.append("uvloop is not installed: the gatekeeper row runs on Python's own loop too.")
    if args.gatekeeper_path:
        notes.append(f"Gatekeeper run from {args.gatekeeper_path}.")
    procs = Procs(workdir, gatekeeper_path=args.gatekeeper_path)
    ctx = Ctx(
        cfg=cfg,
        procs=procs,
        workdir=workdir,
        out=out,
        seed=args.seed,
        asyncio_row=not args.no_asyncio,
        profile=args.profile,
        say=say,
        notes=notes,
    )
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    say(f"{cfg.name} run of {', '.join(names)}; processes log to {workdir}")
    machine = report.machine(args.gatekeeper_path)
    started_at = report.now_iso()
    try:
        results, errors = asyncio.run(_run(ctx, names))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    seconds = round(time.monotonic() - started, 1)
    for result in results.values():  # where each scenario's figures came from
        result["run"] = {
            "command": command.strip(),
            "mode": cfg.name,
            "started_at": started_at,
            "seconds": seconds,
            "gatekeeper_commit": machine["gatekeeper_commit"],
            "gatekeeper_path": args.gatekeeper_path,
            "loadavg": [machine["loadavg_start"], machine["loadavg_end"]],
        }
    document: dict[str, Any] = {
        "schema": 1,
        "mode": cfg.name,
        "command": command.strip(),
        "started_at": started_at,
        "seconds": seconds,
        "machine": machine,
        "config": {k: v for k, v in vars(cfg).items()},
        "notes": ctx.notes,
        "scenarios": results,
        "profiles": ctx.profiles,
        "errors": errors,
    }
    previous = None if set(names) == set(SCENARIOS) else report.previous(out, cfg.name)
    if previous is not None:
        document = report.merge(previous, document)
        say(f"kept the other scenarios' results from {previous['command']!r} in {out}")
    targets = report.judge(document["scenarios"])
    md_path, json_path = report.write(out, document, targets)
    say(f"wrote {md_path} and {json_path}")
    ran = {t.id for t in report.judge(results)}
    for t in targets:
        if t.id in ran:
            mark = "—" if t.met is None else ("met" if t.met else "NOT met")
            print(f"  [{mark:>7}] {t.target}: {t.measured}", file=sys.stderr)
    return 1 if errors else 0
