"""The length of the audio in an upload, read from real files ffmpeg encodes at test time.

ffmpeg comes from Debian's packages through `./scripts/setup --test-tools` (CI runs it), so
these tests fail rather than skip without it, like the e2e tests' tools.
"""

import asyncio
import os
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gatekeeper.audio import audio_seconds, file_seconds
from gatekeeper.sim.audio import wav_header
from gatekeeper.spool import SpooledBody
from tests.e2e.tools import require_tool

SECONDS = 7.5
BOUNDARY = "----gatekeeper-test-7MA4YWxkTrZu0gW"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
GIB = 1 << 30

Spool = Callable[..., Awaitable[SpooledBody]]

# A tone, then noise: a variable bitrate really varies, so an MP3 without a VBR header cannot
# be measured from its first frames.
_SIGNAL = (
    f"aevalsrc=0.4*sin(2*PI*440*t)*lt(t\\,3)+0.4*(random(0)-0.5)*gte(t\\,3):s=48000:d={SECONDS}"
)

# name: (ffmpeg output options, allowed error in seconds). The errors are the codecs' own
# framing: MP3 (LAME) adds its encoder delay and padding, about 50 ms, AAC its priming samples,
# Opus and Vorbis end on a whole packet; a browser's WebM has no duration, its end is its last
# block's timestamp plus one frame.
FORMATS: dict[str, tuple[list[str], float]] = {
    "wav": (["-c:a", "pcm_s16le", "-ar", "16000", "-f", "wav"], 0.001),
    "flac": (["-c:a", "flac", "-f", "flac"], 0.001),
    "mp3-cbr": (["-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3"], 0.06),
    "mp3-vbr": (["-c:a", "libmp3lame", "-q:a", "4", "-f", "mp3"], 0.06),
    "mp3-vbr-no-xing": (["-c:a", "libmp3lame", "-q:a", "4", "-write_xing", "0", "-f", "mp3"], 0.06),
    "ogg-vorbis": (["-c:a", "libvorbis", "-f", "ogg"], 0.01),
    "ogg-opus": (["-c:a", "libopus", "-f", "opus"], 0.01),
    "m4a-aac": (["-c:a", "aac", "-f", "ipod"], 0.03),
    "webm-opus": (["-c:a", "libopus", "-f", "webm"], 0.02),
    "webm-mediarecorder": (["-c:a", "libopus", "-live", "1", "-f", "webm"], 0.05),
}


def _encode(ffmpeg: str, options: list[str], output: Path) -> bytes:
    """Encode the test signal as an encoder writing a file does (headers filled in at the end),
    or, with "pipe:1" as the output, as a live recorder does (nothing filled in)."""
    command = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", _SIGNAL]
    target = "pipe:1" if "-live" in options else str(output)
    result = subprocess.run(
        [*command, "-ac", "1", *options, target], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout if target == "pipe:1" else output.read_bytes()


def _looped(ffmpeg: str, source: Path, times: int, options: list[str], output: Path) -> None:
    """`source` played `times` over, copied without encoding again (a long file in a second)."""
    command = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-stream_loop", str(times - 1)]
    command += ["-i", str(source), "-c", "copy", *options]
    if "-live" in options:
        with output.open("wb") as out:
            result = subprocess.run(
                [*command, "pipe:1"], stdout=out, stderr=subprocess.PIPE, check=False
            )
    else:
        result = subprocess.run([*command, str(output)], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


_PACKETS = ["-show_entries", "packet=pts_time,duration_time"]


def _packet_span(ffprobe: str, path: Path) -> float:
    """From the first packet's start to the last one's end, as ffprobe demuxes them."""
    result = subprocess.run(
        [ffprobe, "-v", "error", "-of", "csv=p=0", *_PACKETS, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [line.strip(",").split(",") for line in result.stdout.split()]
    return float(rows[-1][0]) + float(rows[-1][1]) - float(rows[0][0])


def _as_mediarecorder(webm: bytes) -> bytes:
    """What a browser's MediaRecorder writes: besides no Duration and no Cues (ffmpeg's live
    mode), every Cluster of unknown size, since the recorder cannot go back to write it."""
    data = bytearray(webm)

    def vint(pos: int) -> tuple[int, int]:
        length = 9 - data[pos].bit_length()
        value = int.from_bytes(data[pos : pos + length], "big") & ((1 << (7 * length)) - 1)
        return value, length

    ebml_size, n = vint(4)
    pos = 4 + n + ebml_size  # the Segment
    _, n = vint(pos + 4)
    pos += 4 + n
    clusters = 0
    while pos < len(data):
        element_id_length = 9 - data[pos].bit_length()
        size, n = vint(pos + element_id_length)
        if data[pos : pos + 4] == b"\x1f\x43\xb6\x75":
            size_at = pos + element_id_length
            data[size_at : size_at + n] = bytes([0xFF >> (n - 1)]) + b"\xff" * (n - 1)
            clusters += 1
        pos += element_id_length + n + size
    assert clusters > 0
    return bytes(data)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every format of FORMATS, SECONDS long, as ffmpeg writes it."""
    ffmpeg = require_tool("ffmpeg", "ffmpeg")
    directory = tmp_path_factory.mktemp("encoded")
    files = {
        name: _encode(ffmpeg, options, directory / name) for name, (options, _) in FORMATS.items()
    }
    files["webm-mediarecorder"] = _as_mediarecorder(files["webm-mediarecorder"])
    return files


@pytest.fixture
def spooled(tmp_path: Path) -> Iterator[Spool]:
    """Spool bytes as the gatekeeper does (in memory or on disk); closed after the test."""
    bodies: list[SpooledBody] = []

    async def spool(data: bytes, *, on_disk: bool) -> SpooledBody:
        body = SpooledBody(memory_limit=0 if on_disk else len(data) + 1, directory=tmp_path)
        bodies.append(body)
        chunks = iter([data[i : i + 50_000] for i in range(0, len(data), 50_000)] + [b""])

        async def read() -> bytes:
            return next(chunks)

        await body.fill(read, max_size=1 << 40, idle_timeout=5)
        assert body.on_disk is (on_disk and len(data) > 0)
        return body

    yield spool
    for body in bodies:
        body.close()


async def _sparse(spooled: Spool, head: bytes, gap: int, tail: bytes) -> SpooledBody:
    """A spooled upload of `head`, `gap` bytes of zeros that take no disk, then `tail`."""
    body = await spooled(head, on_disk=True)
    file = body._file  # a test's shortcut: `fill` can only write real bytes
    assert file is not None
    file.truncate(len(head) + gap)
    file.seek(0, os.SEEK_END)
    file.write(tail)
    file.flush()
    body.size = len(head) + gap + len(tail)
    return body


def _form(*parts: tuple[str, str | None, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body: (field name, filename or None, content) per part."""
    out = bytearray()
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


# -- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
async def test_each_format_is_read_to_within_its_framing(
    encoded: dict[str, bytes], name: str, tmp_path: Path, spooled: Spool
) -> None:
    """WAV, FLAC, MP3 (CBR, VBR, VBR without a Xing header), Ogg Vorbis and Opus, M4A and WebM
    (with a duration, and as a browser records it, without) are read to within the codec's own
    framing, as a raw body in memory and on disk and as a plain file."""
    data, tolerance = encoded[name], FORMATS[name][1]
    for on_disk in (False, True):
        body = await spooled(data, on_disk=on_disk)
        seconds = audio_seconds(body, "application/octet-stream")
        assert seconds == pytest.approx(SECONDS, abs=tolerance), (name, on_disk)
    path = tmp_path / name
    path.write_bytes(data)
    assert file_seconds(path) == pytest.approx(SECONDS, abs=tolerance)


@pytest.mark.parametrize("name", list(FORMATS))
async def test_a_truncated_file_is_read_as_no_more_than_it_claims_and_never_raises(
    encoded: dict[str, bytes], name: str, spooled: Spool, tmp_path: Path
) -> None:
    """An upload cut in the middle gives None or at most the whole file's length (never an
    exception); a WAV, an Ogg stream and a browser's WebM count only what arrived."""
    cut = encoded[name][: len(encoded[name]) // 2]
    body = await spooled(cut, on_disk=True)
    seconds = audio_seconds(body, None)
    tolerance = FORMATS[name][1]
    assert seconds is None or 0 <= seconds <= SECONDS + tolerance
    if name in ("wav", "ogg-vorbis", "ogg-opus", "webm-mediarecorder"):
        path = tmp_path / name
        path.write_bytes(cut)
        arrived = _packet_span(require_tool("ffprobe", "ffmpeg"), path)
        assert seconds == pytest.approx(arrived, abs=max(tolerance, 0.03))
        assert seconds < SECONDS * 0.75


def test_hour_long_files_read_from_their_tails_are_exact(
    encoded: dict[str, bytes], tmp_path: Path
) -> None:
    """An hour of Ogg Opus and of a browser's WebM (the short files looped): the end is the last
    page's or cluster's, found from the tail of the file, and matches what ffmpeg demuxes."""
    ffmpeg, ffprobe = require_tool("ffmpeg", "ffmpeg"), require_tool("ffprobe", "ffmpeg")
    loops = 481  # 60 min 7.5 s
    cases = {
        "opus": ("ogg-opus", ["-f", "opus"]),
        "webm": ("webm-opus", ["-live", "1", "-f", "webm"]),
    }
    for name, (source, options) in cases.items():
        short, long = tmp_path / f"short.{name}", tmp_path / f"long.{name}"
        short.write_bytes(encoded[source])
        _looped(ffmpeg, short, loops, options, long)
        if name == "webm":
            long.write_bytes(_as_mediarecorder(long.read_bytes()))
        truth = _packet_span(ffprobe, long)
        assert truth == pytest.approx(loops * SECONDS, abs=1.5)
        assert file_seconds(long) == pytest.approx(truth, abs=0.03), name


# -- WAV headers the library misreads --------------------------------------------------------


@pytest.mark.parametrize("claimed", [0, 0xFFFFFFFF])
async def test_a_streaming_wav_writers_size_field_is_replaced_by_the_bytes_sent(
    claimed: int, spooled: Spool
) -> None:
    """A WAV whose data size is 0 or 0xFFFFFFFF (a writer that never went back) lasts as long
    as its data: 3 s, not 0 s or 37 hours."""
    data = bytes(32_000 * 3)
    body = await spooled(wav_header(len(data), data_size_field=claimed) + data, on_disk=True)
    assert audio_seconds(body, "audio/wav") == pytest.approx(3.0)


async def test_rf64_takes_its_size_from_the_ds64_chunk(spooled: Spool) -> None:
    """An RF64 file (the WAV for more than 4 GB) says its data size in a ds64 chunk."""
    data = bytes(32_000 * 2)
    header = wav_header(len(data), data_size_field=0xFFFFFFFF)
    ds64 = struct.pack("<4sIQQQI", b"ds64", 28, 0, len(data) // 2, 0, 0)
    rf64 = b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + ds64 + header[12:] + data
    body = await spooled(rf64, on_disk=False)
    assert audio_seconds(body, None) == pytest.approx(1.0)


# -- multipart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("on_disk", [False, True])
async def test_the_first_file_part_is_read_wherever_it_is(
    encoded: dict[str, bytes], on_disk: bool, spooled: Spool
) -> None:
    """The audio is the first part with a filename: first, after text fields, or followed by
    more fields; a later file does not count."""
    mp3, wav = encoded["mp3-cbr"], wav_header(32_000 * 2) + bytes(32_000 * 2)
    bodies = {
        "first": _form(("file", "a.mp3", mp3), ("model", None, b"whisper-1")),
        "after a field": _form(("model", None, b"whisper-1"), ("file", "a.mp3", mp3)),
        "between fields": _form(
            ("language", None, b"en"), ("file", "a.mp3", mp3), ("prompt", None, b"x" * 5000)
        ),
        "before another file": _form(("file", "a.mp3", mp3), ("extra", "b.wav", wav)),
    }
    for case, data in bodies.items():
        body = await spooled(data, on_disk=on_disk)
        assert audio_seconds(body, MULTIPART) == pytest.approx(SECONDS, abs=0.06), case


async def test_without_any_filename_the_largest_part_is_the_audio(
    encoded: dict[str, bytes], spooled: Spool
) -> None:
    """`curl -F 'audio_file=<a.flac'` sends the file as a plain field: the largest part."""
    data = _form(("language", None, b"en"), ("audio_file", None, encoded["flac"]))
    body = await spooled(data, on_disk=True)
    assert audio_seconds(body, MULTIPART) == pytest.approx(SECONDS, abs=0.001)


async def test_a_file_part_larger_than_the_probe_ends_where_its_delimiter_is(
    spooled: Spool,
) -> None:
    """A 3 MB WAV part with a streaming writer's size field, followed by a field: its end is
    found from the tail, so the field's bytes are not counted as audio."""
    data = bytes(32_000 * 100)  # 100 s
    wav = wav_header(len(data), data_size_field=0xFFFFFFFF) + data
    form = _form(("file", "a.wav", wav), ("prompt", None, b"p" * 3000))
    body = await spooled(form, on_disk=True)
    assert audio_seconds(body, MULTIPART) == pytest.approx(100.0, abs=1e-6)


async def test_quoted_boundary_and_preamble(encoded: dict[str, bytes], spooled: Spool) -> None:
    """A quoted boundary parameter and a preamble before the first part are understood."""
    data = b"preamble, ignored\r\n" + _form(
        ("file", "a.ogg", encoded["ogg-vorbis"]), boundary="a b"
    )
    body = await spooled(data, on_disk=False)
    content_type = 'multipart/form-data; charset=utf-8; boundary="a b"'
    assert audio_seconds(body, content_type) == pytest.approx(SECONDS, abs=0.01)


# -- what cannot be read ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"", None),
        (bytes(range(256)) * 400, "audio/mpeg"),
        (b"RIFF\x24\x00\x00\x00WAVEdata\x00\x00\x00\x00", "audio/wav"),  # data before fmt
        (b"\x1a\x45\xdf\xa3" + b"\xff" * 100, "audio/webm"),  # EBML magic, then nonsense
        (b"OggS" + bytes(60), "audio/ogg"),
        (b"\x00\x00\x00\x18ftypM4A " + bytes(100), "audio/mp4"),  # an MP4 with no moov
        (_form(("file", "a.wav", b"not audio")), MULTIPART),
        (_form(("file", "a.wav", b"x")), "multipart/form-data"),  # no boundary
        (_form(("file", "a.wav", b"x"))[:40], MULTIPART),  # cut inside the headers
        (b"no delimiter anywhere", MULTIPART),
        (b"--" + BOUNDARY.encode() + b"--\r\n", MULTIPART),  # no part at all
    ],
)
async def test_what_cannot_be_read_is_none_never_an_exception(
    data: bytes, content_type: str | None, spooled: Spool
) -> None:
    """Empty, garbage, broken headers and malformed multipart bodies give None."""
    for on_disk in (False, True):
        body = await spooled(data, on_disk=on_disk)
        assert audio_seconds(body, content_type) is None


async def test_a_closed_body_is_unreadable_not_an_error(tmp_path: Path, spooled: Spool) -> None:
    """The task ended and its spool was freed: None."""
    body = await spooled(wav_header(32_000) + bytes(32_000), on_disk=True)
    body.close()
    assert audio_seconds(body, None) is None
    assert file_seconds(tmp_path / "missing.wav") is None


async def test_a_file_that_would_take_long_to_walk_is_given_up_on(spooled: Spool) -> None:
    """An ID3 tag followed by 200 MB of zeros would have the MP3 reader hunt for a frame 4
    bytes at a time for minutes; the reading's budget of calls stops it in milliseconds."""
    body = await _sparse(spooled, b"ID3\x04\x00\x00\x00\x00\x00\x00", 200 << 20, b"")
    started = time.perf_counter()
    assert audio_seconds(body, "audio/mpeg") is None
    assert time.perf_counter() - started < 0.5


# -- a 1 GB upload ------------------------------------------------------------------------------


async def test_a_1_gib_upload_takes_milliseconds_and_no_memory_to_speak_of(
    spooled: Spool,
) -> None:
    """A 1 GiB multipart upload (a field, a WAV of 9 h 19 min, another field) on disk: its length
    in well under a second, with the memory of a few reads, not of the file."""
    head = _form(("model", None, b"whisper-1")).removesuffix(f"--{BOUNDARY}--\r\n".encode())
    head += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    data_bytes = GIB
    head += wav_header(data_bytes)
    tail = f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n'
    tail += f"--{BOUNDARY}--\r\n"
    body = await _sparse(spooled, head, data_bytes, tail.encode())
    tracemalloc.start()
    try:
        started = time.perf_counter()
        seconds = audio_seconds(body, MULTIPART)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds == pytest.approx(data_bytes / 32_000)
    assert elapsed < 0.5, f"{elapsed:.3f} s"
    assert peak < 4 * 1024 * 1024, f"{peak} bytes at the peak"


# -- threads ------------------------------------------------------------------------------------


async def test_readings_in_threads_beside_the_replay_change_nothing(
    encoded: dict[str, bytes], spooled: Spool
) -> None:
    """Four threads reading one spooled upload while the event loop replays it: every reading
    is right and the replayed bytes are the upload's (the spool's file position is not used)."""
    form = _form(("model", None, b"whisper-1"), ("file", "a.webm", encoded["webm-opus"]))
    for on_disk in (False, True):
        body = await spooled(form, on_disk=on_disk)
        start = threading.Barrier(4)

        def read(body: SpooledBody = body, start: threading.Barrier = start) -> list[float | None]:
            start.wait()
            return [audio_seconds(body, MULTIPART) for _ in range(20)]

        async def replay(body: SpooledBody = body) -> list[bytes]:
            return [b"".join([chunk async for chunk in body.replay()]) for _ in range(20)]

        *readings, replayed = await asyncio.gather(
            *(asyncio.to_thread(read) for _ in range(4)), replay()
        )
        assert all(r == pytest.approx(SECONDS, abs=0.02) for batch in readings for r in batch)
        assert all(chunk == form for chunk in replayed)
