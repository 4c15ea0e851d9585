"""ASR Gatekeeper: an admission-controlled reverse proxy for self-hosted GPU Whisper servers."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("asr-gatekeeper")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
