"""Request bodies kept for the life of a task, so every retry replays the identical bytes.

Small bodies stay in memory; larger ones roll over to an anonymous temporary file (already
unlinked on Linux, so nothing is left on disk even if the process dies). Memory use stays bounded
whatever the upload size.
"""

import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import IO

__all__ = ["BodyTooLarge", "SpooledBody"]

_READ_CHUNK = 256 * 1024


class BodyTooLarge(Exception):
    """The client sent more than ASR_MAX_BODY_SIZE bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class SpooledBody:
    """One task's request body: written once from the client, read back once per attempt."""

    def __init__(self, *, memory_limit: int, directory: Path | None = None) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in close()
            max_size=memory_limit, mode="w+b", dir=None if directory is None else str(directory)
        )
        self.size = 0
        self.complete = False

    async def fill(self, chunks: AsyncIterable[bytes], *, max_size: int) -> None:
        """Copy the client's body in, refusing it as soon as it grows past `max_size`."""
        async for chunk in chunks:
            self.size += len(chunk)
            if self.size > max_size:
                raise BodyTooLarge(max_size)
            self._file.write(chunk)
        self.complete = True

    @property
    def on_disk(self) -> bool:
        """True when the body rolled over from memory to a temporary file."""
        return bool(getattr(self._file, "_rolled", False))

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
