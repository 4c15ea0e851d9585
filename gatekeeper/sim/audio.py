"""How long an uploaded audio file is, as the simulator charges it, and WAV files for tests.

The simulator never decodes audio: processing time and memory only need the duration. It reads
it with the gatekeeper's own reader (`gatekeeper.audio`: WAV, FLAC, MP3, Ogg, MP4, WebM…, from
the headers) from the upload it spooled, and only when that fails estimates it from the size at
a typical byte rate. The upload is hashed as it streams past (`AudioProbe`), so tests can prove
the gatekeeper forwarded every byte unchanged.
"""

import hashlib
import struct
from typing import TYPE_CHECKING

from gatekeeper.audio import WavInfo, parse_wav
from gatekeeper.audio import audio_seconds as read_audio_seconds

if TYPE_CHECKING:
    from gatekeeper.spool import SpooledBody

__all__ = [
    "DEFAULT_BYTE_RATE",
    "HEAD_BYTES",
    "AudioProbe",
    "WavInfo",
    "audio_seconds",
    "estimate_seconds",
    "parse_wav",
    "silent_wav",
    "spooled_seconds",
    "wav_header",
]

DEFAULT_BYTE_RATE = 16_000.0
"""Bytes per second assumed for audio no reader understands: 128 kbit/s, a common mp3 rate."""

HEAD_BYTES = 4096
"""How much of a WAV file `audio_seconds` needs to see for its header."""

# Writers that stream a WAV before knowing its length put one of these in the size field.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def estimate_seconds(total_bytes: int, byte_rate: float = DEFAULT_BYTE_RATE) -> float:
    """Duration of a compressed file of `total_bytes` at `byte_rate` bytes per second."""
    if byte_rate <= 0:
        raise ValueError(f"byte_rate must be > 0, got {byte_rate}")
    return max(0, total_bytes) / byte_rate


def spooled_seconds(audio: "SpooledBody", byte_rate: float = DEFAULT_BYTE_RATE) -> float:
    """The duration of a spooled audio file: read from its headers, else estimated from its size.

    Blocking (it reads the spool): the server runs it in a thread.
    """
    seconds = read_audio_seconds(audio, None)
    return seconds if seconds is not None else estimate_seconds(audio.size, byte_rate)


def audio_seconds(head: bytes, total_bytes: int, byte_rate: float = DEFAULT_BYTE_RATE) -> float:
    """Duration from a WAV header in `head` when there is one, else estimated from the size."""
    info = parse_wav(head, total_bytes)
    if info is not None:
        return info.seconds
    return estimate_seconds(total_bytes, byte_rate)


class AudioProbe:
    """Hashes and counts an upload chunk by chunk."""

    __slots__ = ("_hash", "total_bytes")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> None:
        """Account for the next piece of the upload."""
        self._hash.update(chunk)
        self.total_bytes += len(chunk)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything fed so far."""
        return self._hash.hexdigest()


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
