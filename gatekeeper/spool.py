"""Request bodies kept for the life of a task, so every retry replays the identical bytes.

Small bodies stay in memory; larger ones roll over to an anonymous temporary file (already
unlinked on Linux, so nothing is left on disk even if the process dies). Memory use stays bounded
whatever the upload size.
"""

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO

from gatekeeper.clock import Clock, SystemClock

__all__ = ["BodyTimeout", "BodyTooLarge", "SpooledBody", "UploadTimeout"]

_READ_CHUNK = 256 * 1024


class BodyTooLarge(Exception):
    """The client sent more than ASR_MAX_BODY_SIZE bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class BodyTimeout(Exception):
    """The client stopped sending its body for longer than ASR_CLIENT_BODY_TIMEOUT."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no request body data for {seconds:g} s")
        self.seconds = seconds


class UploadTimeout(Exception):
    """The whole upload took longer than ASR_UPLOAD_TIMEOUT (a steady trickle included)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the upload took longer than {seconds:g} s")
        self.seconds = seconds


class SpooledBody:
    """One task's request body: written once from the client, read back once per attempt.

    Up to `memory_limit` bytes stay in one buffer in memory (no file object at all for the
    common small upload; memory follows the bytes, however small the client's pieces); past it
    everything moves to a temporary file created then.
    """

    def __init__(self, *, memory_limit: int, directory: Path | None = None) -> None:
        self._memory_limit = memory_limit
        self._directory = directory
        self._buffer = bytearray()
        self._whole: bytes | None = None  # the buffer as bytes, once read back
        self._file: IO[bytes] | None = None
        self._closed = False
        self.size = 0
        self.complete = False

    async def fill(
        self,
        read: Callable[[], Awaitable[bytes]],
        *,
        max_size: int,
        idle_timeout: float,
        total_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Copy the client's body in until `read()` returns b"".

        Refuses the body as soon as it grows past `max_size` (BodyTooLarge), gives up when
        the client sends nothing for `idle_timeout` seconds (BodyTimeout) — like nginx's
        client_body_timeout — and when the whole upload takes longer than `total_timeout`
        (UploadTimeout), so a steady trickle of one byte a second cannot last forever either.
        """
        clock = clock or SystemClock()
        total = None if total_timeout is None else clock.monotonic() + total_timeout
        try:
            async with clock.timeout_at(total):
                await self._fill(read, max_size=max_size, idle_timeout=idle_timeout, clock=clock)
        except TimeoutError:
            assert total_timeout is not None
            raise UploadTimeout(total_timeout) from None

    async def _fill(
        self,
        read: Callable[[], Awaitable[bytes]],
        *,
        max_size: int,
        idle_timeout: float,
        clock: Clock,
    ) -> None:
        while True:
            try:
                async with clock.timeout_at(clock.monotonic() + idle_timeout):
                    chunk = await read()
            except TimeoutError:
                raise BodyTimeout(idle_timeout) from None
            if not chunk:
                break
            self.size += len(chunk)
            if self.size > max_size:
                raise BodyTooLarge(max_size)
            self._write(chunk)
        if self._file is not None:
            self._file.flush()  # the whole body on disk: readers by offset see all of it
        self.complete = True

    def _write(self, chunk: bytes) -> None:
        if self._file is not None:
            self._file.write(chunk)
            return
        self._buffer += chunk
        if self.size > self._memory_limit:  # roll over: from now on, a temporary file
            directory = None if self._directory is None else str(self._directory)
            self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed in close()
            self._file.write(self._buffer)
            self._buffer = bytearray()

    @property
    def on_disk(self) -> bool:
        """True when the body rolled over from memory to a temporary file."""
        return self._file is not None

    def in_memory(self) -> bytes | None:
        """The whole body if it never left memory (then it goes upstream in one write)."""
        self._check_open()
        if self._file is not None:
            return None
        if self._whole is None:
            self._whole, self._buffer = bytes(self._buffer), bytearray()
        return self._whole

    def replay(self) -> AsyncIterator[bytes]:
        """The body from its first byte, in chunks (a fresh iterator for every attempt)."""
        self._check_open()
        whole = self.in_memory()
        return self._chunks_of(whole) if whole is not None else self._read_file()

    @staticmethod
    async def _chunks_of(whole: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(whole), _READ_CHUNK):
            yield whole[start : start + _READ_CHUNK]

    async def _read_file(self) -> AsyncIterator[bytes]:
        assert self._file is not None
        self._file.seek(0)
        while True:
            # Reads hit the page cache; they are short enough to do inline.
            chunk = self._file.read(_READ_CHUNK)
            if not chunk:
                return
            yield chunk

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the spooled body was already closed")

    def close(self) -> None:
        """Free the memory or the temporary file (idempotent)."""
        self._closed = True
        self._buffer, self._whole = bytearray(), None
        if self._file is not None:
            self._file.close()
