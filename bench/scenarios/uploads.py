"""Scenario 2 — big uploads: a multipart upload through each proxy, and memory with a queue.

Throughput: one upload at a time, `upload_rounds` rounds rotating the references; MB/s is the
upload's size (10^6 bytes) over the time from its first byte sent to the whole answer read.
The upstream checksums every byte, and the client checks the checksum.

Memory: a fresh gatekeeper with one slot and a queue of `queued_uploads`; the upstream holds the
task in the slot, `queued_uploads` more uploads complete their bodies into the gatekeeper's spool
(checked by summing the sizes of its deleted temporary files), then its VmHWM is read. Done for
each of `queued_sizes_mb`: flat means the peak does not follow the upload size.
"""

import asyncio
import os
import random
import time
import zlib
from collections.abc import Iterator

from bench.httpclient import Connection, HttpError, fetch
from bench.procs import Proc
from bench.scenarios.common import (
    CONTENT_TYPE,
    Ctx,
    JsonDict,
    gatekeeper_variants,
    multipart_parts,
    rotated,
)
from bench.stats import median

__all__ = ["run"]

_BLOCK = 1_000_000
_MB = 1_000_000
_SPOOL_MEMORY = 1 << 20  # the gatekeeper's default ASR_SPOOL_MEMORY_SIZE


class _Upload:
    """A multipart upload of `megabytes` MB of incompressible bytes, and its CRC-32."""

    def __init__(self, megabytes: int, seed: int) -> None:
        self.block = random.Random(seed).randbytes(_BLOCK)
        self.head, self.tail = multipart_parts(filename="meeting.wav")
        self.blocks = megabytes
        self.length = len(self.head) + megabytes * _BLOCK + len(self.tail)
        crc = zlib.crc32(self.head)
        for _ in range(megabytes):
            crc = zlib.crc32(self.block, crc)
        self.crc = zlib.crc32(self.tail, crc)

    def chunks(self, sent: asyncio.Event | None = None) -> Iterator[bytes | memoryview]:
        yield self.head
        view = memoryview(self.block)
        for _ in range(self.blocks):
            yield view
        yield self.tail
        if sent is not None:
            sent.set()  # reached once the tail is written and drained

    async def send(
        self,
        port: int,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        sent: asyncio.Event | None = None,
        within: float = 600.0,
    ) -> tuple[float, str | None]:
        """Upload once; (seconds, None) or (seconds, what went wrong)."""
        conn = Connection("127.0.0.1", port)
        began = time.perf_counter()
        try:
            async with asyncio.timeout(within):
                response = await conn.request(
                    "POST",
                    "/asr",
                    headers=(("Content-Type", CONTENT_TYPE), *headers),
                    body=(self.chunks(sent), self.length),
                )
        except (HttpError, TimeoutError) as exc:
            return time.perf_counter() - began, repr(exc)
        finally:
            await conn.close()
        elapsed = time.perf_counter() - began
        if response.status != 200:
            return elapsed, f"status {response.status}: {response.body[:200]!r}"
        got = (response.headers.get("x-bench-bytes"), response.headers.get("x-bench-crc32"))
        if got != (str(self.length), str(self.crc)):
            return elapsed, f"upstream saw bytes/crc {got}, sent {(self.length, self.crc)}"
        return elapsed, None


def _spooled_bytes(pid: int) -> int:
    """Bytes in the process's open, already unlinked files: the gatekeeper's spool."""
    total = 0
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return 0
    for fd in fds:
        path = f"{fd_dir}/{fd}"
        try:
            if os.readlink(path).endswith("(deleted)"):
                total += os.stat(path).st_size
        except OSError:
            continue
    return total


async def _queued_peak(ctx: Ctx, upstream: Proc, megabytes: int) -> JsonDict:
    """Peak RSS of a fresh gatekeeper holding 1 running + N queued uploads of this size."""
    cfg = ctx.cfg
    queued = cfg.queued_uploads
    upload = _Upload(megabytes, ctx.seed)
    gk = await ctx.procs.gatekeeper(
        upstream.url,
        {"max_concurrent": 1, "max_queue": queued, "queue_timeout": 600, "request_timeout": 600},
    )
    idle_peak = gk.peak_rss_mib()
    await fetch("127.0.0.1", upstream.port, "POST", "/bench/hold")
    sent = [asyncio.Event() for _ in range(queued + 1)]
    tasks = [
        asyncio.create_task(upload.send(gk.port, headers=(("X-Bench-Hold", "1"),), sent=ev))
        for ev in sent
    ]
    want = queued * upload.length
    spooled = 0
    began = time.monotonic()
    try:
        while time.monotonic() - began < 300:
            spooled = _spooled_bytes(gk.pid)
            in_memory = upload.length <= _SPOOL_MEMORY  # small bodies never reach a file
            if all(ev.is_set() for ev in sent) and (spooled >= want or in_memory):
                break
            if any(t.done() for t in tasks):
                break  # something failed early; reported below
            await asyncio.sleep(0.05)
        fill_seconds = time.monotonic() - began
        peak = gk.peak_rss_mib()
        rss_now = gk.rss_mib()
    finally:
        await fetch("127.0.0.1", upstream.port, "POST", "/bench/release")
    results = await asyncio.gather(*tasks)
    failures = [err for _, err in results if err is not None]
    await ctx.procs.kill(gk)
    return {
        "upload_mb": megabytes,
        "uploads": queued + 1,
        "queued_bodies_spooled_mb": round(spooled / _MB, 1),
        "all_queued_spooled": spooled >= want or upload.length <= _SPOOL_MEMORY,
        "fill_seconds": round(fill_seconds, 2),
        "idle_peak_rss_mib": idle_peak,
        "peak_rss_mib": peak,
        "rss_when_full_mib": rss_now,
        "failures": failures[:3],
        "failed": len(failures),
    }


async def run(ctx: Ctx) -> JsonDict:
    cfg = ctx.cfg
    procs = ctx.procs
    upstream = await procs.upstream()
    refs: dict[str, Proc] = {"direct": upstream}
    refs["haproxy"] = await procs.haproxy(
        upstream.port, maxconn=64, maxqueue=640, timeout_queue=600, timeout_server=600
    )
    refs["nginx"] = await procs.nginx(upstream.port)
    settings = {"max_concurrent": 4, "max_queue": 40, "request_timeout": 600}
    for name, extra in gatekeeper_variants(ctx):
        refs[name] = await procs.gatekeeper(upstream.url, {**settings, **extra})
    names = list(refs)
    upload = _Upload(cfg.upload_mb, ctx.seed)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    failures: dict[str, list[str]] = {name: [] for name in names}
    for r in range(cfg.upload_rounds):
        ctx.say(f"uploads: {cfg.upload_mb} MB through each, round {r + 1}/{cfg.upload_rounds}")
        for name in rotated(names, r):
            elapsed, error = await upload.send(refs[name].port)
            if error is None:
                seconds[name].append(elapsed)
            else:
                failures[name].append(error)
    results: dict[str, JsonDict] = {}
    for name in names:
        rates = [round(cfg.upload_mb / s, 1) for s in seconds[name]]
        results[name] = {
            "mb_per_s": round(median(rates) or 0.0, 1),
            "mb_per_s_rounds": rates,
            "failed": len(failures[name]),
            "failures": failures[name][:3],
            "peak_rss_mib": refs[name].peak_rss_mib(),
        }
    nginx_rate = results["nginx"]["mb_per_s"]
    for name in names:
        rate = results[name]["mb_per_s"]
        results[name]["vs_nginx"] = round(rate / nginx_rate, 3) if nginx_rate else None
    for name in names:
        if name != "direct":
            await procs.kill(refs[name])

    queued: list[JsonDict] = []
    for megabytes in cfg.queued_sizes_mb:
        ctx.say(
            f"uploads: gatekeeper with 1 running + {cfg.queued_uploads} queued × {megabytes} MB"
        )
        queued.append(await _queued_peak(ctx, upstream, megabytes))
    await procs.kill(upstream)
    return {
        "setup": {
            "upload_mb": cfg.upload_mb,
            "rounds": cfg.upload_rounds,
            "body": "multipart/form-data, one file of incompressible bytes, Content-Length",
            "nginx": "proxy_request_buffering on (default): the body is buffered to a temp file",
            "haproxy": "streams the body (no http-buffer-request)",
            "gatekeeper": "spools the body (memory up to 1 MiB, then an unlinked temp file), "
            "then replays it upstream",
        },
        "references": results,
        "queued": queued,
    }
