"""Request bodies kept for the life of a task, so every retry replays the identical bytes.

Small bodies stay in memory; larger ones roll over to an anonymous temporary file (already
unlinked on Linux, so nothing is left on disk even if the process dies). Memory use stays bounded
whatever the upload size.
"""

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO

__all__ = ["BodyTimeout", "BodyTooLarge", "SpooledBody"]

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


class SpooledBody:
    """One task's request body: written once from the client, read back once per attempt."""

    def __init__(self, *, memory_limit: int, directory: Path | None = None) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in close()
            max_size=memory_limit, mode="w+b", dir=None if directory is None else str(directory)
        )
        self.size = 0
        self.complete = False

    async def fill(
        self, read: Callable[[], Awaitable[bytes]], *, max_size: int, idle_timeout: float
    ) -> None:
        """Copy the client's body in until `read()` returns b"".

        Refuses the body as soon as it grows past `max_size` (BodyTooLarge), and gives up when
        the client sends nothing for `idle_timeout` seconds (BodyTimeout) — like nginx's
        client_body_timeout, a slow but steady upload is fine, a stalled one is not.
        """
        while True:
            try:
                async with asyncio.timeout(idle_timeout):
                    chunk = await read()
            except TimeoutError:
                raise BodyTimeout(idle_timeout) from None
            if not chunk:
                break
            self.size += len(chunk)
            if self.size > max_size:
                raise BodyTooLarge(max_size)
            self._file.write(chunk)
        self.complete = True

    @property
    def on_disk(self) -> bool:
        """True when the body rolled over from memory to a temporary file."""
        return bool(getattr(self._file, "_rolled", False))

    def in_memory(self) -> bytes | None:
        """The whole body if it never left memory (then it goes upstream in one write)."""
        if self.on_disk:
            return None
        self._file.seek(0)
        return self._file.read()

    async def replay(self) -> AsyncIterator[bytes]:
        """The body from its first byte, in chunks (a fresh iterator for every attempt)."""
        self._file.seek(0)
        while True:
            # Reads hit the page cache or memory; they are short enough to do inline.
            chunk = self._file.read(_READ_CHUNK)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Free the memory or the temporary file (idempotent)."""
        self._file.close()
