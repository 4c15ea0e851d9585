"""How long an uploaded audio file is, judged from its first bytes and its size.

The simulator never decodes audio: processing time and memory only need the duration. A WAV
file says it exactly in its header; anything else (mp3, m4a, ogg…) is estimated from its size
at a typical byte rate. The upload is hashed as it streams past (`AudioProbe`), so tests can
prove the gatekeeper forwarded every byte unchanged without the simulator ever holding the
whole file in memory.
"""

import hashlib
import struct
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BYTE_RATE",
    "HEAD_BYTES",
    "AudioProbe",
    "WavInfo",
    "audio_seconds",
    "estimate_seconds",
    "parse_wav",
    "silent_wav",
    "wav_header",
]

DEFAULT_BYTE_RATE = 16_000.0
"""Bytes per second assumed for non-WAV audio: 128 kbit/s, a common mp3 rate."""

HEAD_BYTES = 4096
"""How much of the upload is kept to read a header; the rest is only hashed and counted."""

# Writers that stream a WAV before knowing its length put one of these in the size field.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


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
    carry LIST/fact/JUNK chunks before the data. A data size of 0 or 0xFFFFFFFF (a streaming
    writer that never went back to fill it in) or one larger than what actually arrived (a
    truncated upload) is replaced by the bytes actually present. Returns None when this is
    not a WAV file or the header does not fit in `head`.
    """
    if len(head) < 12 or head[0:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None
    fmt: tuple[int, int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id = head[pos : pos + 4]
        (size,) = struct.unpack_from("<I", head, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(head):
                return None
            _tag, channels, rate, byte_rate, block_align, bits = struct.unpack_from(
                "<HHIIHH", head, body
            )
            fmt = (channels, rate, byte_rate or rate * block_align, block_align, bits)
        elif chunk_id == b"data":
            if fmt is None or fmt[2] <= 0:
                return None
            available = max(0, total_bytes - body)
            if size in _UNKNOWN_SIZES or size > available:
                size = available
            channels, rate, byte_rate, _align, bits = fmt
            return WavInfo(channels, rate, byte_rate, bits, body, size)
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


def estimate_seconds(total_bytes: int, byte_rate: float = DEFAULT_BYTE_RATE) -> float:
    """Duration of a compressed file of `total_bytes` at `byte_rate` bytes per second."""
    if byte_rate <= 0:
        raise ValueError(f"byte_rate must be > 0, got {byte_rate}")
    return max(0, total_bytes) / byte_rate


def audio_seconds(head: bytes, total_bytes: int, byte_rate: float = DEFAULT_BYTE_RATE) -> float:
    """Duration from the WAV header when there is one, else estimated from the size."""
    info = parse_wav(head, total_bytes)
    if info is not None:
        return info.seconds
    return estimate_seconds(total_bytes, byte_rate)


class AudioProbe:
    """Hashes and counts an upload chunk by chunk, keeping only its first `HEAD_BYTES`."""

    __slots__ = ("_hash", "_head", "total_bytes")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> None:
        """Account for the next piece of the upload."""
        self._hash.update(chunk)
        self.total_bytes += len(chunk)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]

    @property
    def head(self) -> bytes:
        """The first bytes seen (at most `HEAD_BYTES`)."""
        return bytes(self._head)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything fed so far."""
        return self._hash.hexdigest()

    def seconds(self, byte_rate: float = DEFAULT_BYTE_RATE) -> float:
        """Duration of what was fed, as `audio_seconds` judges it."""
        return audio_seconds(self.head, self.total_bytes, byte_rate)


def wav_header(
    data_bytes: int,
    *,
    sample_rate: int = 16_000,
    channels: int = 1,
    bits_per_sample: int = 16,
    data_size_field: int | None = None,
) -> bytes:
    """A canonical 44-byte PCM WAV header for `data_bytes` of samples.

    `data_size_field` overrides what the header claims (0 or 0xFFFFFFFF imitate a streaming
    writer), so tests and demos can build the awkward files real clients send.
    """
    block_align = channels * bits_per_sample // 8
    claimed = data_bytes if data_size_field is None else data_size_field
    riff_size = min(0xFFFFFFFF, 36 + claimed) if claimed not in _UNKNOWN_SIZES else claimed
    return (
        struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE")
        + struct.pack(
            "<4sIHHIIHH",
            b"fmt ",
            16,
            1,
            channels,
            sample_rate,
            sample_rate * block_align,
            block_align,
            bits_per_sample,
        )
        + struct.pack("<4sI", b"data", claimed)
    )


def silent_wav(seconds: float, *, sample_rate: int = 16_000, channels: int = 1) -> bytes:
    """A complete 16-bit PCM WAV file of silence lasting `seconds` (for tests and demos)."""
    frames = round(seconds * sample_rate)
    data_bytes = frames * channels * 2
    header = wav_header(data_bytes, sample_rate=sample_rate, channels=channels)
    return header + bytes(data_bytes)
