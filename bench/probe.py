"""``python -m bench.probe --port N``: time GET /metrics and GET /health during a flood.

A separate process, so that neither the flood's client nor the orchestrator delays the probe:
what it measures is how long the proxy takes to answer an operator's scrape while it refuses
thousands of tasks. It alternates the paths every ``--interval`` seconds until its standard
input closes (or ``--max-seconds`` pass), then prints one JSON object: per path, every probe as
[start on the monotonic clock, latency in seconds], the statuses, and the failed probes.
"""

import argparse
import asyncio
import json
import sys
import time

from bench.httpclient import Connection, HttpError

__all__ = ["main"]


async def _run(port: int, paths: list[str], interval: float, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stopped = asyncio.ensure_future(reader.read())  # EOF: the orchestrator says stop
    conns = {path: Connection("127.0.0.1", port) for path in paths}
    latencies: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
    statuses: dict[str, dict[str, int]] = {path: {} for path in paths}
    errors = 0
    deadline = time.monotonic() + max_seconds
    print("ready", flush=True)
    while not stopped.done() and time.monotonic() < deadline:
        for path in paths:
            began = time.perf_counter()
            began_mono = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
            try:
                async with asyncio.timeout(10):
                    response = await conns[path].request("GET", path)
            except (HttpError, TimeoutError):
                errors += 1
                continue
            latencies[path].append((began_mono, time.perf_counter() - began))
            key = str(response.status)
            statuses[path][key] = statuses[path].get(key, 0) + 1
        await asyncio.wait({stopped}, timeout=interval)
    stopped.cancel()
    for conn in conns.values():
        await conn.close()
    print(json.dumps({"latencies": latencies, "statuses": statuses, "errors": errors}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--paths", default="/metrics,/health")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    asyncio.run(_run(args.port, args.paths.split(","), args.interval, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
