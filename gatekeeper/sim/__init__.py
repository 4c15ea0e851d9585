"""The Whisper simulator: a stand-in GPU Whisper server whose memory model really answers OOM.

Used by the demo, the integration tests and the benchmarks in place of a real GPU. The pure
parts (`memory`, `audio`, `errors`) import no I/O framework; `server` puts them behind aiohttp
and `cli` runs it as ``gatekeeper sim``.
"""

from .audio import AudioProbe, WavInfo, audio_seconds, parse_wav, silent_wav, wav_header
from .errors import ErrorAnswer, ErrorStyle, gpu_error_answer, oom_answer, status_answer
from .memory import GpuCompute, GpuMemory
from .server import TASK_PATHS, JsonValue, OnDisconnect, SimConfig, Simulator

__all__ = [
    "TASK_PATHS",
    "AudioProbe",
    "ErrorAnswer",
    "ErrorStyle",
    "GpuCompute",
    "GpuMemory",
    "JsonValue",
    "OnDisconnect",
    "SimConfig",
    "Simulator",
    "WavInfo",
    "audio_seconds",
    "gpu_error_answer",
    "oom_answer",
    "parse_wav",
    "silent_wav",
    "status_answer",
    "wav_header",
]
