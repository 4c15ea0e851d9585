"""What a failing Whisper server sends back, in the container each real server uses.

The gatekeeper has to recognise an out-of-memory failure however it is wrapped: a PyTorch
traceback, FastAPI's `{"detail": ...}`, an OpenAI-style `{"error": {...}}`, whisper.cpp's
`{"error": ...}` — or not at all, when the server hides the message behind a bare
`Internal Server Error`. Each style here reproduces one of those shapes with the exact wording
the real libraries print (see research/whisper-servers.md), and non-OOM failures come in the
same containers with texts that must *not* be taken for OOM.
"""

import json
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus

__all__ = [
    "ErrorAnswer",
    "ErrorStyle",
    "gpu_error_answer",
    "oom_answer",
    "oom_message",
    "status_answer",
]

_TEXT = "text/plain"
_JSON = "application/json"


class ErrorStyle(StrEnum):
    """How the simulated server wraps its failures, named after who does it that way."""

    PYTORCH = "pytorch"
    """text/plain 500 with the Python traceback (a server that returns `traceback.format_exc()`)."""
    FASTAPI = "fastapi"
    """application/json 500 `{"detail": "<message>"}` (FastAPI HTTPException, speaches)."""
    BARE = "bare"
    """text/plain 500 `Internal Server Error` and nothing else (whisper-asr-webservice)."""
    CTRANSLATE2 = "ctranslate2"
    """text/plain 500 `RuntimeError: CUDA failed with error out of memory` (faster-whisper)."""
    WHISPERCPP = "whispercpp"
    """application/json 500 `{"error": "<ggml message>"}` (whisper.cpp server)."""
    OPENAI = "openai"
    """application/json 500 `{"error": {"message", "type", "code"}}` (LocalAI, vLLM)."""


@dataclass(frozen=True)
class ErrorAnswer:
    """One HTTP answer: status, media type (charset utf-8 implied) and body text."""

    status: int
    content_type: str
    body: str


def oom_message(*, tried_gib: float, total_gib: float, free_gib: float, used_gib: float) -> str:
    """PyTorch ≥ 2.1's CUDA OOM message, with the simulated card's numbers filled in."""
    # PyTorch counts the CUDA context as "non-PyTorch memory"; the rest it splits into
    # allocated and cached-but-unallocated. The split only has to look plausible.
    context_gib = min(0.4, used_gib)
    allocated = (used_gib - context_gib) * 0.92
    unallocated = used_gib - context_gib - allocated
    return (
        f"CUDA out of memory. Tried to allocate {_format_size(tried_gib)}. "
        f"GPU 0 has a total capacity of {_format_size(total_gib)} of which "
        f"{_format_size(free_gib)} is free. Including non-PyTorch memory, this process has "
        f"{_format_size(used_gib)} memory in use. Of the allocated memory "
        f"{_format_size(allocated)} is allocated by PyTorch, and {_format_size(unallocated)} "
        "is reserved by PyTorch but unallocated. If reserved but unallocated memory is large "
        "try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  "
        "See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )


def oom_answer(
    style: ErrorStyle, *, tried_gib: float, total_gib: float, free_gib: float, used_gib: float
) -> ErrorAnswer:
    """The answer to a task that ran out of GPU memory."""
    message = oom_message(
        tried_gib=tried_gib, total_gib=total_gib, free_gib=free_gib, used_gib=used_gib
    )
    match style:
        case ErrorStyle.PYTORCH:
            return ErrorAnswer(500, _TEXT, _traceback("torch.OutOfMemoryError", message))
        case ErrorStyle.FASTAPI:
            return ErrorAnswer(500, _JSON, _dumps({"detail": message}))
        case ErrorStyle.BARE:
            return ErrorAnswer(500, _TEXT, "Internal Server Error")
        case ErrorStyle.CTRANSLATE2:
            return ErrorAnswer(500, _TEXT, "RuntimeError: CUDA failed with error out of memory")
        case ErrorStyle.WHISPERCPP:
            mib = tried_gib * 1024
            text = (
                f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating {mib:.2f} MiB "
                "on device 0: cudaMalloc failed: out of memory"
            )
            return ErrorAnswer(500, _JSON, _dumps({"error": text}))
        case ErrorStyle.OPENAI:
            return _openai(500, message, "server_error")


_ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def gpu_error_answer(style: ErrorStyle) -> ErrorAnswer:
    """A 500 that is *not* out of memory, in the same container as that style's OOM."""
    match style:
        case ErrorStyle.PYTORCH:
            detail = (
                f"{_ILLEGAL_ACCESS}\n"
                "CUDA kernel errors might be asynchronously reported at some other API call, "
                "so the stacktrace below might be incorrect.\n"
                "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
                "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."
            )
            return ErrorAnswer(500, _TEXT, _traceback("RuntimeError", detail))
        case ErrorStyle.FASTAPI:
            return ErrorAnswer(500, _JSON, _dumps({"detail": "Failed to decode audio."}))
        case ErrorStyle.BARE:
            return ErrorAnswer(500, _TEXT, "Internal Server Error")
        case ErrorStyle.CTRANSLATE2:
            return ErrorAnswer(
                500,
                _TEXT,
                "RuntimeError: CUDA failed with error an illegal memory access was encountered",
            )
        case ErrorStyle.WHISPERCPP:
            return ErrorAnswer(500, _JSON, _dumps({"error": "failed to process audio"}))
        case ErrorStyle.OPENAI:
            return _openai(500, _ILLEGAL_ACCESS, "server_error")


def status_answer(style: ErrorStyle, status: int) -> ErrorAnswer:
    """A small answer with an arbitrary status (for steering 4xx/5xx tests), in the style."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    if status in (204, 304) or status < 200:
        return ErrorAnswer(status, _TEXT, "")
    match style:
        case ErrorStyle.PYTORCH | ErrorStyle.BARE | ErrorStyle.CTRANSLATE2 if status >= 500:
            return ErrorAnswer(status, _TEXT, phrase)
        case ErrorStyle.WHISPERCPP:
            return ErrorAnswer(status, _JSON, _dumps({"error": phrase}))
        case ErrorStyle.OPENAI:
            kind = "server_error" if status >= 500 else "invalid_request_error"
            return _openai(status, phrase, kind)
        case _:
            # FastAPI's HTTPException shape: what the Python servers send for 4xx.
            return ErrorAnswer(status, _JSON, _dumps({"detail": phrase}))


def _openai(status: int, message: str, kind: str) -> ErrorAnswer:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return ErrorAnswer(status, _JSON, _dumps(body))


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _traceback(exc_type: str, message: str) -> str:
    """A traceback shaped like the one openai-whisper prints from whisper-asr-webservice."""
    return (
        "Traceback (most recent call last):\n"
        '  File "/app/app/webservice.py", line 98, in asr\n'
        "    result = asr_model.transcribe(load_audio(audio_file.file, encode), task, "
        "language, initial_prompt, vad_filter, word_timestamps, output)\n"
        '  File "/app/app/asr_models/openai_whisper_engine.py", line 43, in transcribe\n'
        "    result = self.model.transcribe(audio, **options_dict)\n"
        '  File "/usr/local/lib/python3.10/site-packages/whisper/transcribe.py", '
        "line 295, in transcribe\n"
        "    result: DecodingResult = decode_with_fallback(mel_segment)\n"
        '  File "/usr/local/lib/python3.10/site-packages/whisper/decoding.py", '
        "line 738, in run\n"
        "    tokens, sum_logprobs, no_speech_probs = self._main_loop(audio_features, tokens)\n"
        '  File "/usr/local/lib/python3.10/site-packages/torch/nn/modules/module.py", '
        "line 1736, in _call_impl\n"
        "    return forward_call(*args, **kwargs)\n"
        f"{exc_type}: {message}\n"
    )


def _format_size(gib: float) -> str:
    """Sizes the way c10's `format_size` prints them: bytes, KiB, MiB or GiB, two decimals."""
    size = max(0, round(gib * 1024**3))
    if size <= 1024:
        return f"{size} bytes"
    if size <= 1024**2:
        return f"{size / 1024:.2f} KiB"
    if size <= 1024**3:
        return f"{size / 1024**2:.2f} MiB"
    return f"{size / 1024**3:.2f} GiB"
