"""The simulator's audio duration (headers read by the gatekeeper's reader, else the size at a
byte rate), WAV headers, and the streaming upload probe."""

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.sim.audio import (
    HEAD_BYTES,
    AudioProbe,
    audio_seconds,
    estimate_seconds,
    parse_wav,
    silent_wav,
    spooled_seconds,
    wav_header,
)
from gatekeeper.spool import SpooledBody


@pytest.mark.parametrize("seconds", [0.0, 0.5, 2.5, 61.0])
def test_wav_duration_comes_from_the_header(seconds: float) -> None:
    """A canonical 16 kHz mono WAV's duration is its data size over its byte rate."""
    wav = silent_wav(seconds)
    info = parse_wav(wav[:HEAD_BYTES], len(wav))
    assert info is not None
    assert info.seconds == pytest.approx(seconds)
    assert (info.sample_rate, info.channels, info.bits_per_sample) == (16_000, 1, 16)


def test_stereo_cd_quality_wav() -> None:
    """Sample rate and channels in the fmt chunk decide the byte rate."""
    wav = silent_wav(1.5, sample_rate=44_100, channels=2)
    assert audio_seconds(wav[:HEAD_BYTES], len(wav)) == pytest.approx(1.5)


@pytest.mark.parametrize("claimed", [0, 0xFFFFFFFF])
def test_streaming_writer_size_uses_the_bytes_that_arrived(claimed: int) -> None:
    """A data size of 0 or 0xFFFFFFFF (never filled in) is replaced by the actual byte count."""
    data = bytes(32_000 * 3)
    wav = wav_header(len(data), data_size_field=claimed) + data
    assert audio_seconds(wav[:HEAD_BYTES], len(wav)) == pytest.approx(3.0)


def test_truncated_upload_counts_only_what_arrived() -> None:
    """A header promising 10 s over a file cut after 4 s gives 4 s."""
    header = wav_header(32_000 * 10)
    total = len(header) + 32_000 * 4
    assert audio_seconds(header, total) == pytest.approx(4.0)


def test_chunks_before_data_are_walked_over_with_padding() -> None:
    """LIST and odd-sized chunks before 'data' do not confuse the parser."""
    data = bytes(32_000 * 2)
    canonical = wav_header(len(data))
    riff, fmt, data_header = canonical[:12], canonical[12:36], canonical[36:]
    odd = struct.pack("<4sI", b"JUNK", 3) + b"abc" + b"\x00"  # padded to even length
    listing = (
        struct.pack("<4sI", b"LIST", 20) + b"INFOISFT" + struct.pack("<I", 8) + b"Lavf60\x00\x00"
    )
    wav = riff + fmt + odd + listing + data_header + data
    info = parse_wav(wav[:HEAD_BYTES], len(wav))
    assert info is not None
    assert info.data_offset == len(riff + fmt + odd + listing + data_header)
    assert info.seconds == pytest.approx(2.0)


def test_rf64_with_placeholder_size_is_understood() -> None:
    """RF64 files (sizes in a ds64 chunk, 0xFFFFFFFF in the header) use the actual bytes."""
    data = bytes(32_000)
    wav = b"RF64" + wav_header(len(data), data_size_field=0xFFFFFFFF)[4:] + data
    assert audio_seconds(wav[:HEAD_BYTES], len(wav)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "head",
    [
        b"ID3\x04\x00" + bytes(100),  # an mp3
        b"RIFF\x00\x00\x00\x00AVI LIST",  # RIFF but not WAVE
        b"RIFF\x24\x00\x00\x00WAVEdata\x00\x00\x00\x00",  # data before fmt
        b"RIFF",  # too short
    ],
)
def test_non_wav_is_estimated_from_size(head: bytes) -> None:
    """Anything that is not a usable WAV header counts 16000 bytes per second."""
    assert parse_wav(head, 160_000) is None
    assert audio_seconds(head, 160_000) == pytest.approx(10.0)


def test_byte_rate_is_configurable() -> None:
    """A different assumed bitrate changes the estimate for compressed audio."""
    assert estimate_seconds(64_000, byte_rate=8_000) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="byte_rate"):
        estimate_seconds(1, byte_rate=0)


def test_probe_hashes_and_counts_everything() -> None:
    """The probe's hash and size cover the whole upload, fed in pieces."""
    wav = silent_wav(1.0)
    probe = AudioProbe()
    for start in range(0, len(wav), 1000):
        probe.feed(wav[start : start + 1000])
    assert probe.sha256 == hashlib.sha256(wav).hexdigest()
    assert probe.total_bytes == len(wav)


@given(st.binary(max_size=10_000), st.lists(st.integers(min_value=1, max_value=3000), max_size=10))
def test_chunking_never_changes_what_the_probe_sees(data: bytes, cuts: list[int]) -> None:
    """However the upload is split into chunks, hash and size are the same."""
    probe = AudioProbe()
    position = 0
    for size in cuts:
        probe.feed(data[position : position + size])
        position += size
    probe.feed(data[position:])
    assert probe.sha256 == hashlib.sha256(data).hexdigest()
    assert probe.total_bytes == len(data)


async def _spooled(data: bytes, tmp_path: Path) -> SpooledBody:
    body = SpooledBody(memory_limit=1000, directory=tmp_path)
    chunks = iter([data, b""])

    async def read() -> bytes:
        return next(chunks)

    await body.fill(read, max_size=1 << 30, idle_timeout=5)
    return body


@pytest.mark.parametrize("claimed", [None, 0xFFFFFFFF])
async def test_the_simulator_reads_the_length_as_the_gatekeeper_does(
    tmp_path: Path, claimed: int | None
) -> None:
    """A spooled WAV's length comes from the gatekeeper's reader (a streaming writer's size
    field included), not from the byte rate."""
    data = bytes(32_000 * 3)
    body = await _spooled(wav_header(len(data), data_size_field=claimed) + data, tmp_path)
    assert spooled_seconds(body, byte_rate=1.0) == pytest.approx(3.0)
    body.close()


async def test_what_no_reader_understands_is_estimated_from_its_size(tmp_path: Path) -> None:
    """Bytes no reader understands last their size over the byte rate: the last resort."""
    body = await _spooled(bytes(range(256)) * 625, tmp_path)  # 160,000 bytes
    assert spooled_seconds(body) == pytest.approx(10.0)
    assert spooled_seconds(body, byte_rate=8_000) == pytest.approx(20.0)
    body.close()
