"""How long the audio in an upload is, read from the spool without decoding it.

`audio_seconds` finds the audio in a spooled request body (the first file part of a
multipart/form-data body, or the whole body) and reads its length from the container's headers
(docs/audio-length.md says which library and why):

- WAV by the header walk here: the library takes a streaming writer's size field (0 or
  0xFFFFFFFF) or a truncated upload at its word, and does not read RF64;
- Ogg Vorbis and Opus here: the length is the last page's granule position, read from the
  tail (the library walks every packet of the file to find it);
- WebM/Matroska here too: no maintained pure-Python reader knows the container, and a browser's
  MediaRecorder file has no duration in its header at all, so the end of its last cluster is
  read from the tail of the file;
- everything else (MP3, MP4/M4A, FLAC, AIFF, WMA, and any Ogg or WAV the readers above leave)
  by tinytag.

Only headers and the few blocks needed are read, through a window onto the spool that reads
with `os.pread` (the spool's own file position is never moved) and gives up past a budget of
calls and bytes, so a 1 GB upload costs milliseconds and a few hundred kilobytes of memory,
and a hostile file cannot make it read for long. Blocking I/O, no asyncio: callers run it in
a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Final, Self, cast

from tinytag import TinyTag

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from gatekeeper.spool import SpooledBody

__all__ = ["WavInfo", "audio_seconds", "file_seconds", "parse_wav"]

_log = logging.getLogger(__name__)

_CHUNK: Final = 64 * 1024
"""Read size when looking for a multipart boundary."""
_PROBE: Final = 1024 * 1024
"""How far a part's end is looked for from its start before it is looked for from the tail."""
_HEADERS_LIMIT: Final = 16 * 1024
"""A part's headers longer than this are not a well-formed upload."""
_HEAD: Final = 64 * 1024
"""The first bytes of the audio, for the WAV and Matroska headers."""
_TAIL: Final = 4 * 1024 * 1024
"""How far from the end the last Matroska cluster is looked for (a browser's audio cluster
holds at most about 33 s, about 2 MB even at Opus's highest bitrate)."""

# What one reading may cost, whatever the file says: far above any real file's needs (a WAV,
# Ogg, WebM or FLAC takes a few calls, an MP4 a few dozen, an MP3 without a VBR header at most
# a few thousand) and a fraction of a second of CPU (docs/audio-length.md).
_MAX_CALLS: Final = 10_000
_MAX_READ: Final = 4 * 1024 * 1024
_MAX_BYTES: Final = 64 * 1024 * 1024

ReadAt = Callable[[int, int], bytes]
"""`read_at(offset, size)`: up to `size` bytes of the body from `offset`."""


class _TooCostly(Exception):
    """The reading went past its budget: the file is treated as unreadable."""


# -- the body: random access without touching the spool's file position ----------------------


class _Body:
    """Random access to a body's bytes, safe beside the event loop's use of it.

    A body on disk is read with `os.pread` on a duplicate of its descriptor: no shared file
    position, and the bytes stay readable even if the task ends and the spool is closed
    meanwhile. A body in memory is read from its buffer, which is never written once the
    upload is complete.
    """

    def __init__(self, *, fd: int | None = None, data: bytes | bytearray = b"") -> None:
        self._fd = fd
        self._data = data
        self.size = len(data) if fd is None else os.fstat(fd).st_size

    @classmethod
    def of_spool(cls, body: SpooledBody) -> _Body:
        # SpooledBody offers no random-access read; this is the one place that looks inside,
        # and it changes nothing there (`in_memory()` would, racing the loop's replay).
        # `_buffer` before `_whole`: in_memory() sets `_whole` before it empties `_buffer`,
        # so one of the two holds the body whenever this runs.
        file = body._file
        if file is not None:
            # The spool's last writes may still sit in its buffer, out of reach of a pread.
            # Flushing is safe from this thread (a buffered file takes its own lock) and
            # changes no position.
            file.flush()
            return cls(fd=os.dup(file.fileno()))
        buffer, whole = body._buffer, body._whole
        return cls(data=whole if whole is not None else buffer)

    @classmethod
    def of_path(cls, path: str | os.PathLike[str]) -> _Body:
        return cls(fd=os.open(path, os.O_RDONLY))

    def read_at(self, offset: int, size: int) -> bytes:
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        if self._fd is None:
            return bytes(self._data[offset:end])
        parts = []
        while offset < end:
            got = os.pread(self._fd, end - offset, offset)
            if not got:
                break
            parts.append(got)
            offset += len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Window(io.RawIOBase):
    """A read-only, seekable file onto bytes [start, end) of the body, on a budget.

    This is what the library reads: it sees a file of `end - start` bytes. Every call counts,
    and so does every byte, so a file that would need the library to walk it for long (a
    gigabyte of zeros behind an ID3 tag, an Ogg stream of tiny pages) is given up on instead.
    """

    def __init__(self, read_at: ReadAt, start: int, end: int) -> None:
        super().__init__()
        self._read_at = read_at
        self._start = start
        self.size = max(0, end - start)
        self._pos = 0
        self._calls = 0
        self._bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._spend(0)
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def pread(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` of the window (the file position stays)."""
        size = max(0, min(size, self.size - offset))
        self._spend(size)
        return self._read_at(self._start + offset, size) if size else b""

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        data = self.pread(self._pos, size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _spend(self, size: int) -> None:
        self._calls += 1
        self._bytes += size
        if self._calls > _MAX_CALLS or size > _MAX_READ or self._bytes > _MAX_BYTES:
            raise _TooCostly(f"{self._calls} calls, {self._bytes} bytes, one of {size}")


# -- public entry points ----------------------------------------------------------------------


def audio_seconds(body: SpooledBody, content_type: str | None) -> float | None:
    """Seconds of audio in a complete spooled request body, or None when it cannot be read.

    For a multipart/form-data body (by `content_type`) the audio is the first part with a
    filename, else the largest part; for anything else, the whole body. Never raises for
    what a client sent: an unknown format, a broken or truncated file, a malformed multipart
    body all give None. The caller keeps the body open until this returns; it may run in a
    worker thread beside other readings and beside the body's replay.
    """
    try:
        with _Body.of_spool(body) as source:
            start, end = 0, source.size
            boundary = _multipart_boundary(content_type)
            if boundary is not None:
                part = _audio_part(source, boundary)
                if part is None:
                    return None
                start, end = part
            return _seconds(_Window(source.read_at, start, end))
    except Exception:
        _log.debug("audio length unreadable", exc_info=True)
        return None


def file_seconds(path: str | os.PathLike[str]) -> float | None:
    """Seconds of audio in a plain audio file (what `audio_seconds` does to an upload's part)."""
    try:
        with _Body.of_path(Path(path)) as source:
            return _seconds(_Window(source.read_at, 0, source.size))
    except Exception:
        _log.debug("audio length unreadable: %s", path, exc_info=True)
        return None


def _seconds(window: _Window) -> float | None:
    head = window.pread(0, _HEAD)
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        info = parse_wav(head, window.size)
        if info is not None:
            return info.seconds
    if head[:4] == _EBML_MAGIC:
        return _matroska_seconds(window, head)
    if head[:4] == b"OggS":
        seconds = _ogg_seconds(window, head)
        if seconds is not None:
            return seconds
    window.seek(0)
    tag = TinyTag.get(file_obj=cast(BinaryIO, window), tags=False, duration=True)
    seconds = tag.duration
    # tinytag says 0 when it found no length (a fragmented MP4): unknown, not short.
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return float(seconds)


# -- multipart: where the audio part is ---------------------------------------------------------


def _multipart_boundary(content_type: str | None) -> bytes | None:
    if not content_type:
        return None
    message = Message()
    message["Content-Type"] = content_type
    if message.get_content_maintype() != "multipart":
        return None
    boundary = message.get_boundary()
    if not boundary or len(boundary) > 200:
        return None
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        return None


_FILENAME = re.compile(rb"(?im)^content-disposition:[^\r\n]*;\s*filename\*?\s*=")


def _audio_part(source: _Body, boundary: bytes) -> tuple[int, int] | None:
    """The byte range of the audio in a multipart body: the first part with a filename.

    Parts are walked from the start. A part's end is looked for within `_PROBE` bytes of its
    start; past that (a large file) it is found from the tail: the first delimiter in the last
    `_PROBE` bytes, since the content of a part never holds its boundary. So only the first
    and the last megabyte of a body are read, whatever its size. With no filename anywhere,
    the largest part is taken (a part too large to see the end of is taken at once).
    """
    delimiter = b"--" + boundary
    position = _find(source, delimiter, 0, min(source.size, _PROBE))
    if position < 0 or (position > 0 and source.read_at(position - 2, 2) != b"\r\n"):
        return None
    largest: tuple[int, int] | None = None
    while True:
        after = position + len(delimiter)
        if source.read_at(after, 2) == b"--":
            return largest  # the closing delimiter: no part had a filename
        block = source.read_at(after, _HEADERS_LIMIT)
        line_end = block.find(b"\r\n")
        headers_end = block.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if headers_end < 0:
            return None
        headers = block[line_end + 2 : headers_end]
        start = after + headers_end + 4
        next_delimiter = b"\r\n" + delimiter
        end = _find(source, next_delimiter, start, min(source.size, start + _PROBE))
        if end < 0:
            # Too large to see the end of from here: it is the audio.
            tail = max(start, source.size - _PROBE)
            end = _find(source, next_delimiter, tail, source.size)
            return start, source.size if end < 0 else end
        if _FILENAME.search(headers):
            return start, end
        if largest is None or end - start > largest[1] - largest[0]:
            largest = (start, end)
        position = end + 2


def _find(source: _Body, needle: bytes, start: int, stop: int) -> int:
    """The first position of `needle` wholly within [start, stop), read in chunks; or -1."""
    overlap = len(needle) - 1
    position = start
    while position < stop:
        chunk = source.read_at(position, min(_CHUNK + overlap, stop - position))
        found = chunk.find(needle)
        if found >= 0:
            return position + found
        if len(chunk) <= overlap:
            break
        position += len(chunk) - overlap
    return -1


# -- WAV --------------------------------------------------------------------------------------

# Writers that stream a WAV before knowing its length put one of these in the size field.
_UNKNOWN_SIZES: Final = (0, 0xFFFFFFFF)


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header says, with the data size already corrected for truncation."""

    channels: int
    sample_rate: int
    byte_rate: int
    bits_per_sample: int
    data_offset: int
    data_bytes: int

    @property
    def seconds(self) -> float:
        """Duration of the audio data."""
        return self.data_bytes / self.byte_rate


def parse_wav(head: bytes, total_bytes: int) -> WavInfo | None:
    """Read a RIFF/WAVE (or RF64) header from the first bytes of a file of `total_bytes`.

    Chunks are walked rather than assuming the 44-byte canonical layout, because real files
    carry LIST/fact/JUNK chunks before the data. RF64's 64-bit data size comes from its ds64
    chunk. A data size of 0 or 0xFFFFFFFF (a streaming writer that never went back to fill it
    in) or one larger than what actually arrived (a truncated upload) is replaced by the
    bytes actually present. Returns None when this is not a WAV file or the header does not
    fit in `head`.
    """
    if len(head) < 12 or head[0:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None
    fmt: tuple[int, int, int, int] | None = None
    ds64_data: int | None = None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id = head[pos : pos + 4]
        (size,) = struct.unpack_from("<I", head, pos + 4)
        body = pos + 8
        if chunk_id == b"ds64" and size >= 16 and body + 16 <= len(head):
            (ds64_data,) = struct.unpack_from("<Q", head, body + 8)
        elif chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(head):
                return None
            _tag, channels, rate, byte_rate, block_align, bits = struct.unpack_from(
                "<HHIIHH", head, body
            )
            fmt = (channels, rate, byte_rate or rate * block_align, bits)
        elif chunk_id == b"data":
            if fmt is None or fmt[2] <= 0:
                return None
            if size == 0xFFFFFFFF and ds64_data:
                size = ds64_data
            available = max(0, total_bytes - body)
            if size in _UNKNOWN_SIZES or size > available:
                size = available
            channels, rate, byte_rate, bits = fmt
            return WavInfo(channels, rate, byte_rate, bits, body, size)
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


# -- Ogg ----------------------------------------------------------------------------------------

_OGG_PAGE: Final = struct.Struct(
    "<4sBBqIIIB"
)  # capture, version, type, granule, serial, …, segments
_OGG_MAX_PAGE: Final = 27 + 255 + 255 * 255


def _ogg_seconds(window: _Window, head: bytes) -> float | None:
    """(Last granule position − pre-skip) / rate, for an Opus or Vorbis stream; else None."""
    if len(head) < _OGG_PAGE.size:
        return None
    fields: tuple[bytes, int, int, int, int, int, int, int] = _OGG_PAGE.unpack_from(head)
    serial, segments = fields[4], fields[7]
    packet = head[_OGG_PAGE.size + segments : _OGG_PAGE.size + segments + 32]
    pre_skip: int
    rate: int
    if packet.startswith(b"OpusHead") and len(packet) >= 12:
        (pre_skip,) = struct.unpack_from("<H", packet, 10)
        rate = 48_000  # Opus granules count 48 kHz samples whatever the input rate
    elif packet.startswith(b"\x01vorbis") and len(packet) >= 16:
        pre_skip = 0
        (rate,) = struct.unpack_from("<I", packet, 12)
    else:
        return None  # Ogg FLAC, Speex…: the library's
    granule = _last_granule(window, serial)
    if granule is None or rate <= 0:
        return None
    return max(0, granule - pre_skip) / rate


def _last_granule(window: _Window, serial: int) -> int | None:
    """The granule position of the stream's last complete page, from the tail of the file."""
    start = max(0, window.size - 2 * _OGG_MAX_PAGE)
    tail = window.pread(start, window.size - start)
    pos = len(tail)
    while (pos := tail.rfind(b"OggS", 0, pos)) >= 0:
        if pos + _OGG_PAGE.size > len(tail):
            continue
        fields: tuple[bytes, int, int, int, int, int, int, int] = _OGG_PAGE.unpack_from(tail, pos)
        version, granule, page_serial, segments = fields[1], fields[3], fields[4], fields[7]
        table = tail[pos + _OGG_PAGE.size : pos + _OGG_PAGE.size + segments]
        complete = len(table) == segments and pos + _OGG_PAGE.size + segments + sum(table) <= len(
            tail
        )
        # A granule of -1 marks a page on which no packet ends.
        if version == 0 and page_serial == serial and granule >= 0 and complete:
            return granule
    return None


# -- WebM / Matroska ----------------------------------------------------------------------------

_EBML_MAGIC: Final = b"\x1a\x45\xdf\xa3"
_SEGMENT: Final = 0x18538067
_INFO: Final = 0x1549A966
_CLUSTER: Final = 0x1F43B675
_CLUSTER_BYTES: Final = b"\x1f\x43\xb6\x75"
_TIMESTAMP_SCALE: Final = 0x2AD7B1
_DURATION: Final = 0x4489
_TIMESTAMP: Final = 0xE7
_SIMPLE_BLOCK: Final = 0xA3
_BLOCK_GROUP: Final = 0xA0
_BLOCK: Final = 0xA1
_BLOCK_DURATION: Final = 0x9B
# Segment children: inside a cluster of unknown size, one of these means the cluster ended.
_TOP_LEVEL: Final = frozenset(
    {_CLUSTER, _INFO, 0x114D9B74, 0x1654AE6B, 0x1C53BB6B, 0x1254C367, 0x1043A770, 0x1941A469}
)
_MAX_SEGMENT_CHILDREN: Final = 64


@dataclass(frozen=True)
class _Element:
    id: int
    size: int | None  # None: unknown (a live writer's Segment or Cluster)
    data: int  # offset of its content


def _element(buffer: bytes, pos: int) -> _Element | None:
    """The EBML element header at `pos`, or None when there is no valid one."""
    if pos >= len(buffer):
        return None
    first = buffer[pos]
    id_length = 8 - first.bit_length() + 1
    if first == 0 or id_length > 4 or pos + id_length >= len(buffer):
        return None
    element_id = int.from_bytes(buffer[pos : pos + id_length], "big")
    pos += id_length
    first = buffer[pos]
    size_length = 8 - first.bit_length() + 1
    if first == 0 or pos + size_length > len(buffer):
        return None
    size = int.from_bytes(buffer[pos : pos + size_length], "big") & ((1 << (7 * size_length)) - 1)
    unknown = size == (1 << (7 * size_length)) - 1
    return _Element(element_id, None if unknown else size, pos + size_length)


def _uint(data: bytes) -> int:
    return int.from_bytes(data, "big") if 0 < len(data) <= 8 else 0


def _matroska_seconds(window: _Window, head: bytes) -> float | None:
    """The Segment's Duration, or for a file without one, the end of its last block."""
    ebml = _element(head, 0)
    if ebml is None or ebml.size is None:
        return None
    segment = _element(head, ebml.data + ebml.size)
    if segment is None or segment.id != _SEGMENT:
        return None
    scale = 1_000_000  # nanoseconds per timestamp unit, Matroska's default
    duration: float | None = None
    first_cluster: int | None = None
    first_timestamp = 0
    pos = segment.data
    for _ in range(_MAX_SEGMENT_CHILDREN):
        header = window.pread(pos, 12)
        child = _element(header, 0)
        if child is None:
            break
        start = pos + child.data
        if child.id == _INFO and child.size is not None and child.size <= _HEAD:
            info = window.pread(start, child.size)
            scale, duration = _info(info, scale)
        elif child.id == _CLUSTER:
            first_cluster = pos
            cluster = window.pread(start, 64)
            first_timestamp = _first_timestamp(cluster) or 0
            break
        if child.size is None:
            break
        pos = start + child.size
    if duration is not None and duration > 0:
        return duration * scale / 1e9
    end = _last_block_end(window, first_cluster or segment.data)
    if end is None:
        return None
    return max(0, end - first_timestamp) * scale / 1e9


def _info(info: bytes, scale: int) -> tuple[int, float | None]:
    duration: float | None = None
    pos = 0
    while (element := _element(info, pos)) is not None and element.size is not None:
        data = info[element.data : element.data + element.size]
        if element.id == _TIMESTAMP_SCALE:
            scale = _uint(data) or scale
        elif element.id == _DURATION and len(data) in (4, 8):
            (duration,) = struct.unpack(">f" if len(data) == 4 else ">d", data)
            if not math.isfinite(duration):
                duration = None
        pos = element.data + element.size
    return scale, duration


def _first_timestamp(cluster: bytes) -> int | None:
    pos = 0
    for _ in range(4):  # the Timestamp comes first, after at most a CRC or a Void
        element = _element(cluster, pos)
        if element is None or element.size is None:
            return None
        if element.id == _TIMESTAMP:
            return _uint(cluster[element.data : element.data + element.size])
        pos = element.data + element.size
    return None


def _last_block_end(window: _Window, first_cluster: int) -> int | None:
    """End timestamp of the file's last cluster, found from the tail: last block + its length.

    A block's length is its BlockDuration when it has one, else the gap to the block before
    it on the same track (constant for a browser's Opus or Vorbis frames). The tail read
    grows (256 KiB, 1 MiB, 4 MiB) until it holds a whole last cluster.
    """
    for size in (_TAIL // 16, _TAIL // 4, _TAIL):
        tail_start = max(first_cluster, window.size - size)
        tail = window.pread(tail_start, window.size - tail_start)
        pos = len(tail)
        while (pos := tail.rfind(_CLUSTER_BYTES, 0, pos)) >= 0:
            end = _cluster_end(tail, pos)
            if end is not None:
                return end
        if tail_start == first_cluster:
            break
    return None


def _cluster_end(tail: bytes, pos: int) -> int | None:
    cluster = _element(tail, pos)
    if cluster is None or cluster.id != _CLUSTER:
        return None
    stop = len(tail) if cluster.size is None else min(len(tail), cluster.data + cluster.size)
    timestamp = _first_timestamp(tail[cluster.data : cluster.data + 64])
    if timestamp is None:
        return None
    last: dict[int, tuple[int, int]] = {}  # track: (timestamp of its last block, its length)
    pos = cluster.data
    while (element := _element(tail, pos)) is not None and element.size is not None:
        if element.id in _TOP_LEVEL:
            break
        if element.id == _SIMPLE_BLOCK:
            _block(tail, element.data, timestamp, None, last)
        elif element.id == _BLOCK_GROUP:
            _block_group(tail, element, timestamp, last)
        pos = element.data + element.size
        if pos >= stop:
            break
    if not last:
        return timestamp
    return max(block + length for block, length in last.values())


def _block_group(
    tail: bytes, group: _Element, timestamp: int, last: dict[int, tuple[int, int]]
) -> None:
    assert group.size is not None
    block: int | None = None
    duration: int | None = None
    pos, stop = group.data, group.data + group.size
    while pos < stop and (element := _element(tail, pos)) is not None:
        if element.size is None:
            return
        if element.id == _BLOCK:
            block = element.data
        elif element.id == _BLOCK_DURATION:
            duration = _uint(tail[element.data : element.data + element.size])
        pos = element.data + element.size
    if block is not None:
        _block(tail, block, timestamp, duration, last)


def _block(
    tail: bytes, pos: int, timestamp: int, duration: int | None, last: dict[int, tuple[int, int]]
) -> None:
    """Note one (Simple)Block: its track, its timestamp, and how long it lasts."""
    if pos >= len(tail):
        return
    track_length = 8 - tail[pos].bit_length() + 1
    if tail[pos] == 0 or pos + track_length + 2 > len(tail):
        return
    track = int.from_bytes(tail[pos : pos + track_length], "big")
    (relative,) = struct.unpack_from(">h", tail, pos + track_length)
    block = timestamp + relative
    previous = last.get(track)
    if duration is None:
        duration = block - previous[0] if previous is not None and block > previous[0] else 0
        if duration == 0 and previous is not None:
            duration = previous[1]
    if previous is None or block >= previous[0]:
        last[track] = (block, duration)
