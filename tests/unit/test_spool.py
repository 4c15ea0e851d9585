"""SpooledBody: one task's request body, kept whole for every retry, in memory or on disk."""

import os
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gatekeeper import spool
from gatekeeper.spool import BodyTooLarge, SpooledBody


def _reader(chunks: list[bytes]) -> Callable[[], Awaitable[bytes]]:
    parts = iter([*chunks, b""])

    async def read() -> bytes:
        return next(parts)

    return read


async def _replayed(body: SpooledBody) -> bytes:
    return b"".join([chunk async for chunk in body.replay()])


async def _filled(chunks: list[bytes], limit: int, directory: Path) -> SpooledBody:
    body = SpooledBody(memory_limit=limit, directory=directory)
    await body.fill(_reader(chunks), max_size=1 << 30, idle_timeout=5)
    return body


@pytest.mark.parametrize(
    ("size", "limit", "on_disk"),
    [(0, 0, False), (1, 0, True), (100, 100, False), (101, 100, True), (300_000, 65_536, True)],
)
async def test_memory_up_to_the_limit_then_disk_and_every_replay_is_identical(
    tmp_path: Path, size: int, limit: int, on_disk: bool
) -> None:
    data = os.urandom(size)
    chunks = [data[i : i + 7_000] for i in range(0, size, 7_000)]
    body = await _filled(chunks, limit, tmp_path)
    assert (body.size, body.complete, body.on_disk) == (size, True, on_disk)
    assert body.in_memory() == (None if on_disk else data)
    for _ in range(3):  # every attempt replays the same bytes from the first one
        assert await _replayed(body) == data
    assert body.in_memory() == (None if on_disk else data)
    body.close()
    body.close()  # idempotent


async def test_a_trickle_of_tiny_chunks_costs_its_bytes_not_an_object_each(
    tmp_path: Path,
) -> None:
    """Memory follows the bytes, not the number of reads: 4,000 two-byte pieces below the limit
    are held in about 8 KB (one object each would be over 100 KB), and past the limit they go
    to disk like one big piece would."""

    def trickle(count: int) -> Callable[[], Awaitable[bytes]]:
        sent = 0

        async def read() -> bytes:  # a fresh object a read, as from a socket
            nonlocal sent
            sent += 1
            return sent.to_bytes(2, "big") if sent <= count else b""

        return read

    tracemalloc.start()
    try:
        small = SpooledBody(memory_limit=10_000, directory=tmp_path)
        await small.fill(trickle(4_000), max_size=1 << 30, idle_timeout=5)
        mine = [tracemalloc.Filter(True, spool.__file__), tracemalloc.Filter(True, __file__)]
        held = sum(
            s.size for s in tracemalloc.take_snapshot().filter_traces(mine).statistics("filename")
        )
    finally:
        tracemalloc.stop()
    assert (small.size, small.on_disk) == (8_000, False)
    assert held < 20_000, f"{held} bytes held for an 8,000-byte body"
    assert small.in_memory() == b"".join(n.to_bytes(2, "big") for n in range(1, 4_001))
    big = SpooledBody(memory_limit=4_096, directory=tmp_path)
    await big.fill(trickle(5_000), max_size=1 << 30, idle_timeout=5)
    assert big.on_disk
    assert len(await _replayed(big)) == 10_000
    small.close()
    big.close()


async def test_the_temporary_file_is_unlinked_and_closed(tmp_path: Path) -> None:
    body = await _filled([os.urandom(50_000)], 1_000, tmp_path)
    assert body.on_disk
    assert os.listdir(tmp_path) == []  # anonymous: nothing to clean up if the process dies
    fds = len(os.listdir("/proc/self/fd"))
    body.close()
    assert len(os.listdir("/proc/self/fd")) == fds - 1


async def test_too_large_stops_reading_at_once(tmp_path: Path) -> None:
    body = SpooledBody(memory_limit=10, directory=tmp_path)
    reads = 0

    async def read() -> bytes:
        nonlocal reads
        reads += 1
        return b"z" * 100

    with pytest.raises(BodyTooLarge):
        await body.fill(read, max_size=250, idle_timeout=5)
    assert reads == 3
    body.close()


@pytest.mark.parametrize("size", [10, 10_000])
async def test_a_closed_body_cannot_be_replayed(tmp_path: Path, size: int) -> None:
    body = await _filled([b"a" * size], 1_000, tmp_path)
    body.close()
    with pytest.raises(ValueError, match="closed"):
        body.in_memory()
    with pytest.raises(ValueError, match="closed"):
        body.replay()
