"""The flags of `gatekeeper tune`, and the run's `TuneConfig` built once from them."""

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gatekeeper.settings import server_name
from gatekeeper.sim.audio import HEAD_BYTES, audio_seconds, parse_wav, silent_wav

__all__ = [
    "API_ROUTES",
    "ApiRoute",
    "AudioItem",
    "TuneConfig",
    "add_tune_arguments",
    "config_from_args",
]


@dataclass(frozen=True, slots=True)
class ApiRoute:
    """Where a task goes and how the audio is attached, per Whisper server family (SPEC)."""

    path: str
    field: str
    sends_model: bool = False


API_ROUTES: Final = {
    "asr": ApiRoute("/asr", "audio_file"),  # whisper-asr-webservice
    "openai": ApiRoute("/v1/audio/transcriptions", "file", sends_model=True),  # speaches, vLLM
    "whispercpp": ApiRoute("/inference", "file"),  # whisper.cpp server
}


@dataclass(frozen=True, slots=True)
class AudioItem:
    """One audio file the tasks send, with its duration (for goodput)."""

    name: str
    data: bytes = field(repr=False)
    seconds: float


@dataclass(frozen=True, slots=True)
class TuneConfig:
    """Everything one run needs, built once from the flags.

    `urls` holds one Whisper server per GPU; several are measured one after the other (each
    card alone: the others idle), each with its own levels and recommendation.
    """

    urls: tuple[str, ...]
    api: str
    audio: tuple[AudioItem, ...]
    tasks_per_level: int = 8
    max_level: int = 8
    timeout: float = 600.0
    pause: float = 5.0
    model: str = "whisper-1"
    out_dir: Path | None = None
    yes: bool = False
    gpu_memory_gib: tuple[float, ...] | None = None
    """--gpu-memory-gib: each card's free memory for tasks (one value for all, or one per card);
    None: asked of the simulator's /sim/state, else unknown."""

    @property
    def pool(self) -> bool:
        """Several cards: the output has one section per card and the combined settings."""
        return len(self.urls) > 1

    def gpu_memory_for(self, url: str) -> float | None:
        """The memory given for this card with --gpu-memory-gib, if any."""
        given = self.gpu_memory_gib
        if given is None:
            return None
        return given[0] if len(given) == 1 else given[self.urls.index(url)]


# -- the flags -----------------------------------------------------------------------------------


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `gatekeeper tune`."""
    _add_server_arguments(parser)
    _add_audio_arguments(parser)
    _add_load_arguments(parser)
    parser.add_argument(
        "--gpu-memory-gib",
        metavar="GIB[,GIB…]",
        help="GPU memory free for tasks on the card, in GiB (its total minus what the idle "
        "server holds, model loaded: nvidia-smi's total − used), one value or one per card; "
        "with it tune recommends ASR_GPU_MEMORY_GIB, ASR_TASK_MEMORY_GIB and "
        "ASR_TASK_MEMORY_PER_MINUTE_GIB for admission by memory (default: asked of the "
        "simulator's /sim/state; a real server cannot tell, and the figures are then given "
        "per GiB of it). With several --durations each length is also climbed alone until it "
        "runs out of memory, to tell the base from the per-minute part",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("tune-results"),
        metavar="DIR",
        help="directory for the JSON and Markdown results (default: %(default)s)",
    )
    parser.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="do not ask before loading a server that already has traffic",
    )


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url",
        nargs="*",
        metavar="URL",
        help="base URL of the Whisper server (or the simulator), e.g. http://whisper:9000; "
        "not the gatekeeper: tune loads the server directly. Several servers (one per GPU, as "
        "in ASR_UPSTREAM_URL): several URLs or a comma list; each card is measured in turn, "
        "alone, and gets its own recommendation, then the combined ASR_MAX_CONCURRENT=a,b,c",
    )
    parser.add_argument(
        "--upstream-url",
        dest="upstream_url",
        help="the same as URL (a comma list for several servers, like ASR_UPSTREAM_URL)",
    )
    parser.add_argument(
        "--api",
        choices=sorted(API_ROUTES),
        default="asr",
        help="asr: POST /asr, field audio_file (whisper-asr-webservice); openai: POST "
        "/v1/audio/transcriptions, field file (speaches, vLLM); whispercpp: POST /inference, "
        "field file (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default="whisper-1",
        help="model form field sent with --api openai (default: %(default)s)",
    )


def _add_audio_arguments(parser: argparse.ArgumentParser) -> None:
    audio = parser.add_mutually_exclusive_group()
    audio.add_argument(
        "--audio", type=Path, metavar="FILE", help="an audio file to send with every task"
    )
    audio.add_argument(
        "--durations",
        default=None,
        metavar="SECONDS,…",
        help="send generated silent 16 kHz WAVs of these durations in turn (default: 300). "
        "Servers with voice-activity filtering skip silence: use --audio with real speech there",
    )
    parser.add_argument(
        "--audio-seconds",
        type=float,
        default=None,
        help="duration of --audio when it is not a WAV (otherwise estimated from its size)",
    )


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks-per-level",
        type=int,
        default=8,
        metavar="N",
        help="tasks sent at each level, rounded up to a multiple of the level so every slot "
        "stays busy to the end (default: %(default)s)",
    )
    parser.add_argument(
        "--max-level", type=int, default=8, help="highest concurrency to try (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one task may take before it counts as a timeout (default: %(default)s)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=5.0,
        help="seconds to wait between levels so the server can free memory (default: %(default)s)",
    )


# -- from flags to the config --------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """Check the flags and load or generate the audio; ValueError names what is wrong."""
    urls = _urls(args)
    _check_numbers(args)
    return TuneConfig(
        urls=urls,
        api=args.api,
        audio=_audio(args),
        tasks_per_level=args.tasks_per_level,
        max_level=args.max_level,
        timeout=args.timeout,
        pause=args.pause,
        model=args.model,
        out_dir=args.out,
        yes=args.yes,
        gpu_memory_gib=_gpu_memory(args.gpu_memory_gib, len(urls)),
    )


def _urls(args: argparse.Namespace) -> tuple[str, ...]:
    """The servers to measure, in order: URL arguments (each may be a comma list) or
    --upstream-url; each once, without a trailing slash."""
    given = _split_urls(args.url or [])
    flag = _split_urls([args.upstream_url] if args.upstream_url else [])
    if given and flag and given != flag:
        raise ValueError("URL and --upstream-url differ; give one")
    urls = given or flag
    if not urls:
        raise ValueError("give the Whisper server's URL (URL or --upstream-url)")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"URL must start with http:// or https://, got {url!r}")
    names = [server_name(url) for url in urls]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"the same server is listed twice: {', '.join(twice)}")
    return urls


def _split_urls(values: list[str]) -> tuple[str, ...]:
    return tuple(
        part.strip().rstrip("/") for value in values for part in value.split(",") if part.strip()
    )


def _gpu_memory(text: str | None, cards: int) -> tuple[float, ...] | None:
    """--gpu-memory-gib: positive GiB, one value for every card or one per card in order."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"--gpu-memory-gib must be GiB separated by commas, got {text!r}"
        ) from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--gpu-memory-gib must be more than 0 GiB, got {text!r}")
    if len(values) not in (1, cards):
        raise ValueError(
            f"--gpu-memory-gib has {len(values)} values for {cards} card(s): give one for all, "
            "or one per card in the same order"
        )
    return values


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("tasks_per_level", "max_level"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.timeout > 0:
        raise ValueError("--timeout must be > 0")
    if not args.pause >= 0:
        raise ValueError("--pause must be >= 0")


def _audio(args: argparse.Namespace) -> tuple[AudioItem, ...]:
    if args.audio is not None:
        return (_load_audio(args.audio, args.audio_seconds),)
    if args.audio_seconds is not None:
        raise ValueError("--audio-seconds goes with --audio")
    return tuple(_generated(d) for d in _parse_durations(args.durations or "300"))


def _parse_durations(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--durations must be seconds separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--durations must be positive seconds, got {text!r}")
    return values


def _generated(seconds: float) -> AudioItem:
    return AudioItem(f"silence-{seconds:g}s.wav", silent_wav(seconds), seconds)


def _load_audio(path: Path, seconds: float | None) -> AudioItem:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read --audio {path}: {exc.strerror or exc}") from None
    if seconds is None:
        seconds = _wav_seconds(path, data)
    if not seconds > 0:
        raise ValueError(f"{path.name} has no audio (duration {seconds:g} s)")
    return AudioItem(path.name, data, seconds)


def _wav_seconds(path: Path, data: bytes) -> float:
    if parse_wav(data[:HEAD_BYTES], len(data)) is None:
        raise ValueError(f"{path.name} is not a WAV file: give its duration with --audio-seconds")
    return audio_seconds(data[:HEAD_BYTES], len(data))
