"""What the task path (handler, runner, relay) needs from the settings, resolved once."""

from dataclasses import dataclass

from gatekeeper.policy.classify import OomMatcher
from gatekeeper.policy.retry import RetryPolicy
from gatekeeper.settings import Settings

__all__ = ["MIN_ATTEMPT_TIMEOUT", "ProxyConfig"]

MIN_ATTEMPT_TIMEOUT = 60.0
"""The shortest timeout an attempt scaled by its audio gets (the seed: 1 min → 30–60 s)."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The task path's settings; rebuilt whole on a live change (running tasks keep theirs)."""

    upstreams: tuple[str, ...]
    """The Whisper servers' base URLs, in ASR_UPSTREAM_URL's order."""
    upstream_names: tuple[str, ...]
    """Their names (host:port) for logs."""
    gated_paths: tuple[str, ...]
    task_methods: frozenset[str]
    max_body_size: int
    spool_memory_size: int
    spool_dir: str | None
    queue_timeout: float
    request_timeout: float
    client_body_timeout: float
    upload_timeout: float
    timeout_hold: float
    timeout_per_audio_minute: float | None
    oom_window: float
    oom_cooldown: float
    retry: RetryPolicy
    matcher: OomMatcher

    @classmethod
    def from_settings(cls, settings: Settings) -> "ProxyConfig":
        return cls(
            upstreams=settings.upstream_urls,
            upstream_names=settings.upstream_names,
            gated_paths=settings.gated_paths,
            task_methods=frozenset(settings.task_methods),
            max_body_size=settings.max_body_size,
            spool_memory_size=settings.spool_memory_size,
            spool_dir=str(settings.spool_dir) if settings.spool_dir else None,
            queue_timeout=settings.queue_timeout,
            request_timeout=settings.request_timeout,
            client_body_timeout=settings.client_body_timeout,
            upload_timeout=settings.upload_timeout,
            timeout_hold=settings.timeout_hold_s,
            timeout_per_audio_minute=settings.timeout_per_audio_minute,
            oom_window=settings.oom_window_s,
            oom_cooldown=settings.oom_cooldown_s,
            retry=RetryPolicy(
                max_retries=settings.max_retries,
                base=settings.retry_delay,
                jitter=settings.retry_jitter,
                retry_on_timeout=settings.retry_on_timeout,
            ),
            matcher=settings.oom_matcher(),
        )

    def attempt_timeout(self, audio_seconds: float | None) -> float:
        """One attempt's timeout: ASR_REQUEST_TIMEOUT, or with ASR_TIMEOUT_PER_AUDIO_MINUTE that
        many seconds per minute of audio, at least `MIN_ATTEMPT_TIMEOUT`, never above
        ASR_REQUEST_TIMEOUT (the worst case; also for files of unknown length)."""
        per_minute = self.timeout_per_audio_minute
        if per_minute is None or audio_seconds is None:
            return self.request_timeout
        scaled = max(MIN_ATTEMPT_TIMEOUT, per_minute * audio_seconds / 60.0)
        return min(self.request_timeout, scaled)

    def is_task(self, method: str, path: str) -> bool:
        """Work for the GPU: a task method (POST) on a task path; the rest passes through."""
        return method in self.task_methods and path.startswith(self.gated_paths)
