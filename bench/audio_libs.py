"""``python -m bench.audio_libs``: which library reads how long an upload's audio is.

Compares the gatekeeper's reader (`gatekeeper.audio`: tinytag plus its own WAV, Ogg and
WebM readers) with tinytag alone, mutagen, pymediainfo and PyAV on files ffmpeg encodes now
(7.5 s of each format, a browser's MediaRecorder WebM, a Safari-style fragmented MP4, hour-long
Ogg Opus and WebM) and on a 1 GiB WAV and a 1 GiB multipart upload on disk. Each reading runs
in a fresh process, after one warm-up reading of a small file, and reports the length read,
the wall time, the peak of the Python heap (tracemalloc, in a second reading) and the growth
of the process's peak resident memory (RSS high-water mark, which sees C allocations too).

The candidates are installed at pinned versions with pip (`--target`) into a cache folder
outside the repository (~/.cache/asr-gatekeeper-audio-libs), never into .venv. Needs ffmpeg
(`./scripts/setup --test-tools`). Prints Markdown tables (docs/audio-length.md shows them)
and, with --json, the raw numbers.

    .venv/bin/python -m bench.audio_libs [--json out.json] [--keep DIR]
"""

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatekeeper.audio import audio_seconds, file_seconds
from gatekeeper.sim.audio import wav_header
from gatekeeper.spool import SpooledBody

__all__ = ["CANDIDATES", "main"]

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asr-gatekeeper-audio-libs"

CANDIDATES = {
    "tinytag": "tinytag==2.3.2",
    "mutagen": "mutagen==1.48.1",
    "pymediainfo": "pymediainfo==7.0.1",
    "av": "av==18.1.0",  # PyAV 19 needs Python 3.12; the gatekeeper supports 3.11
}

SECONDS = 7.5
GIB = 1 << 30
_SIGNAL = (
    f"aevalsrc=0.4*sin(2*PI*440*t)*lt(t\\,3)+0.4*(random(0)-0.5)*gte(t\\,3):s=48000:d={SECONDS}"
)
# name: ffmpeg output options; "-live" ones are written to a pipe, as a live recorder writes.
FORMATS: dict[str, list[str]] = {
    "WAV": ["-c:a", "pcm_s16le", "-ar", "16000", "-f", "wav"],
    "FLAC": ["-c:a", "flac", "-f", "flac"],
    "MP3 CBR": ["-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3"],
    "MP3 VBR": ["-c:a", "libmp3lame", "-q:a", "4", "-f", "mp3"],
    "MP3 VBR, no Xing header": ["-c:a", "libmp3lame", "-q:a", "4", "-write_xing", "0", "-f", "mp3"],
    "Ogg Vorbis": ["-c:a", "libvorbis", "-f", "ogg"],
    "Ogg Opus": ["-c:a", "libopus", "-f", "opus"],
    "M4A AAC": ["-c:a", "aac", "-f", "ipod"],
    "MP4 AAC, fragmented (Safari)": [
        "-c:a",
        "aac",
        "-movflags",
        "frag_keyframe+empty_moov+default_base_moof",
        "-f",
        "mp4",
    ],
    "WebM Opus": ["-c:a", "libopus", "-f", "webm"],
    "WebM Opus, MediaRecorder": ["-c:a", "libopus", "-live", "1", "-f", "webm"],
}

# -- readings, one per library: the length in seconds of a plain file, or None --------------


def _read_gatekeeper(path: str) -> float | None:
    return file_seconds(path)


def _read_tinytag(path: str) -> float | None:
    tinytag: Any = importlib.import_module("tinytag")
    with open(path, "rb") as file:
        seconds = tinytag.TinyTag.get(file_obj=file, tags=False).duration
    return None if seconds is None else float(seconds)


def _read_mutagen(path: str) -> float | None:
    mutagen: Any = importlib.import_module("mutagen")
    with open(path, "rb") as file:
        found = mutagen.File(file)
    return None if found is None else float(found.info.length)


def _read_pymediainfo(path: str) -> float | None:
    pymediainfo: Any = importlib.import_module("pymediainfo")
    with open(path, "rb") as file:  # a file object, as the gatekeeper would pass its window
        text = pymediainfo.MediaInfo.parse(file, output="General;%Duration%", full=False)
    return float(text) / 1000 if text.strip() else None


def _read_av(path: str) -> float | None:
    av: Any = importlib.import_module("av")
    with open(path, "rb") as file, av.open(file) as container:
        duration = container.duration
    return None if duration is None else duration / 1_000_000


READERS: dict[str, Callable[[str], float | None]] = {
    "gatekeeper.audio": _read_gatekeeper,
    "tinytag": _read_tinytag,
    "mutagen": _read_mutagen,
    "pymediainfo": _read_pymediainfo,
    "av": _read_av,
}


_BOUNDARY = "----bench-audio-libs"


def _sparse_upload() -> SpooledBody:
    """A 1 GiB multipart upload spooled on disk (a field, a WAV, a field), made sparse: the
    spool is filled with the head, then grown without writing the gigabyte (a shortcut)."""
    head = (
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + wav_header(GIB)
    tail = f'\r\n--{_BOUNDARY}\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n'
    tail += f"--{_BOUNDARY}--\r\n"
    body = SpooledBody(memory_limit=0)
    chunks = iter([head, b""])

    async def read() -> bytes:
        return next(chunks)

    asyncio.run(body.fill(read, max_size=1 << 40, idle_timeout=60))
    file = body._file
    assert file is not None
    file.truncate(len(head) + GIB)
    file.seek(0, os.SEEK_END)
    file.write(tail.encode())
    file.flush()
    body.size = len(head) + GIB + len(tail)
    return body


def _worker(reader: str, path: str, warm: str) -> dict[str, Any]:
    """One reading in this fresh process: warm up on a small file, then measure."""
    if reader == "upload":
        body = _sparse_upload()
        content_type = f"multipart/form-data; boundary={_BOUNDARY}"
        read: Callable[[str], float | None] = lambda _: audio_seconds(body, content_type)  # noqa: E731
        warm_up = READERS["gatekeeper.audio"]
    else:
        read = warm_up = READERS[reader]
    with contextlib.suppress(Exception):  # a library that fails here fails below too
        warm_up(warm)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        seconds, error = read(path), None
    except Exception as exc:
        seconds, error = None, f"{type(exc).__name__}: {exc}"[:120]
    elapsed = time.perf_counter() - started
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    # Once more under tracemalloc (which slows Python code, so apart from the timing): the
    # peak of the Python heap; the RSS high-water mark above also sees C allocations.
    tracemalloc.start()
    with contextlib.suppress(Exception):
        read(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "seconds": seconds,
        "error": error,
        "ms": elapsed * 1000,
        "rss_kib": grown,
        "heap_kib": peak / 1024,
    }


# -- the files --------------------------------------------------------------------------------


def _ffmpeg(*args: str, stdout: Any = subprocess.PIPE) -> None:
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args]
    result = subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.decode(errors='replace')}")


def _encode(directory: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for index, (name, options) in enumerate(FORMATS.items()):
        path = directory / f"f{index}"
        source = ["-f", "lavfi", "-i", _SIGNAL, "-ac", "1", *options]
        if "-live" in options:
            with path.open("wb") as out:
                _ffmpeg(*source, "pipe:1", stdout=out)
            path.write_bytes(_unknown_cluster_sizes(path.read_bytes()))
        else:
            _ffmpeg(*source, str(path))
        files[name] = path
    # An hour (and 7.5 s) of Ogg Opus and of a MediaRecorder WebM: the short files looped.
    for name, source_name, options in (
        ("Ogg Opus, 1 h", "Ogg Opus", ["-f", "opus"]),
        ("WebM Opus, MediaRecorder, 1 h", "WebM Opus", ["-live", "1", "-f", "webm"]),
    ):
        path = directory / f"long{len(files)}"
        loop = ["-stream_loop", "480", "-i", str(files[source_name]), "-c", "copy", *options]
        if "-live" in options:
            with path.open("wb") as out:
                _ffmpeg(*loop, "pipe:1", stdout=out)
            path.write_bytes(_unknown_cluster_sizes(path.read_bytes()))
        else:
            _ffmpeg(*loop, str(path))
        files[name] = path
    return files


def _unknown_cluster_sizes(webm: bytes) -> bytes:
    """Every Cluster of unknown size, as a browser's MediaRecorder writes them."""
    data = bytearray(webm)

    def vint(pos: int) -> tuple[int, int]:
        length = 9 - data[pos].bit_length()
        return int.from_bytes(data[pos : pos + length], "big") & ((1 << (7 * length)) - 1), length

    size, n = vint(4)
    pos = 4 + n + size
    _, n = vint(pos + 4)
    pos += 4 + n
    while pos < len(data):
        id_length = 9 - data[pos].bit_length()
        size, n = vint(pos + id_length)
        if data[pos : pos + 4] == b"\x1f\x43\xb6\x75":
            at = pos + id_length
            data[at : at + n] = bytes([0xFF >> (n - 1)]) + b"\xff" * (n - 1)
        pos += id_length + n + size
    return bytes(data)


def _big_wav(directory: Path) -> Path:
    """A 1 GiB WAV, sparse (no disk used)."""
    wav = directory / "1gib.wav"
    with wav.open("wb") as out:
        out.write(wav_header(GIB - 44))
        out.truncate(GIB)
    return wav


def _packet_span(path: Path) -> float:
    """From the first packet's start to the last one's end, as ffprobe demuxes them."""
    entries = ["-show_entries", "packet=pts_time,duration_time", "-of", "csv=p=0"]
    result = subprocess.run(
        ["ffprobe", "-v", "error", *entries, str(path)], capture_output=True, text=True, check=True
    )
    rows = [line.strip(",").split(",") for line in result.stdout.split()]
    return float(rows[-1][0]) + float(rows[-1][1]) - float(rows[0][0])


# -- the run ----------------------------------------------------------------------------------


def _install() -> None:
    """The candidates at their pinned versions, into the cache folder (once)."""
    stamp = CACHE / ".installed"
    want = " ".join(sorted(CANDIDATES.values()))
    if stamp.exists() and stamp.read_text() == want:
        return
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", "--target", str(CACHE), *CANDIDATES.values()], check=True)
    stamp.write_text(want)


def _measure(reader: str, path: Path, warm: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(CACHE)])}
    command = [sys.executable, "-m", "bench.audio_libs", "--worker", reader, str(path), str(warm)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        return {"seconds": None, "error": result.stderr.strip().splitlines()[-1:], "ms": 0.0}
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def _cell(result: dict[str, Any], truth: float) -> str:
    seconds = result["seconds"]
    if seconds is None:
        return "error" if result.get("error") else "none"
    off = seconds - truth
    return f"{seconds:.3f}" if abs(off) < 0.1 else f"**{seconds:.3f}**"


def _table(rows: dict[str, dict[str, dict[str, Any]]], truths: dict[str, float]) -> str:
    readers = list(READERS)
    lines = [
        "| file | " + " | ".join(readers) + " |",
        "|---|" + "---|" * len(readers),
    ]
    for name, results in rows.items():
        cells = []
        for reader in readers:
            result = results.get(reader)
            if result is None:
                cells.append("")
                continue
            cell = _cell(result, truths[name])
            if name.endswith(("1 h", "1 GiB")) and "heap_kib" in result:
                cell += f" · {result['ms']:.1f} ms · {result['heap_kib']:.0f} KiB"
                cell += f" · +{result['rss_kib'] / 1024:.0f} MiB"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sizes() -> str:
    """What each candidate takes once installed (its files in the cache folder)."""
    lines = ["| package | installed |", "|---|---|"]
    for name in CANDIDATES:
        size = sum(
            path.stat().st_size
            for top in CACHE.iterdir()
            if top.name == name or top.name.startswith((f"{name}.", f"{name}-"))
            for path in ([top] if top.is_file() else top.rglob("*"))
            if path.is_file()
        )
        lines.append(f"| {CANDIDATES[name]} | {size / 1e6:.1f} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audio_libs", description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--keep", type=Path, help="keep the encoded files in this folder")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return 0
    if shutil.which("ffmpeg") is None:
        print("audio_libs: ffmpeg is needed: ./scripts/setup --test-tools", file=sys.stderr)
        return 1
    _install()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        files = _encode(directory)
        truths = {name: SECONDS for name in FORMATS}
        for name in ("Ogg Opus, 1 h", "WebM Opus, MediaRecorder, 1 h"):
            truths[name] = _packet_span(files[name])
        files["WAV, 1 GiB"] = _big_wav(directory)
        truths["WAV, 1 GiB"] = (GIB - 44) / 32_000
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        for name, path in files.items():
            rows[name] = {reader: _measure(reader, path, files["WAV"]) for reader in READERS}
            print(f"  {name}: done", file=sys.stderr)
        truths["multipart upload, 1 GiB"] = GIB / 32_000
        upload = _measure("upload", files["WAV"], files["WAV"])
        rows["multipart upload, 1 GiB"] = {"gatekeeper.audio": upload}
    print(_table(rows, truths))
    print()
    print(_sizes())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
