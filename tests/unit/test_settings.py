"""Settings: defaults from the seed, derived values, and clear errors for bad values."""

import subprocess
import sys
from pathlib import Path

import pytest

from gatekeeper.settings import Settings, SettingsError, load_settings


def _load(**values: object):  # type: ignore[no-untyped-def]
    return load_settings({"upstream_url": "http://whisper:9000", **values}, env_file=None)


def test_defaults_follow_the_seed() -> None:
    """Unset values take the seed's numbers, and derived ones follow their base."""
    s = _load()
    assert (s.max_concurrent, s.queue_limit, s.max_retries, s.retry_delay) == (1, 10, 3, 10.0)
    assert (s.request_timeout, s.queue_timeout) == (300.0, 600.0)
    assert (s.oom_window_s, s.oom_cooldown_s) == (30.0, 15.0)
    assert s.gated_paths == ("/asr", "/detect-language", "/v1/audio/", "/inference")
    assert s.max_body_size == 1073741824


def test_derived_defaults_move_with_their_base() -> None:
    """max_queue is 10 × concurrency, the OOM window and cool-down 3× and 1.5× the delay."""
    s = _load(max_concurrent=2, retry_delay=4)
    assert (s.queue_limit, s.oom_window_s, s.oom_cooldown_s) == (20, 12.0, 6.0)
    assert _load(max_concurrent=2, max_queue=0).queue_limit == 0
    assert not _load(max_concurrent=2).queue_follows_limit  # fixed limit: a fixed queue


def test_adaptive_mode_sizes_the_queue_by_its_limit_and_skips_the_cool_down() -> None:
    """Adaptive: the queue starts at 10 × the starting limit and follows it (unless set), and
    the cool-down defaults to 0 (the cut after an OOM holds starts back); set values win."""
    s = _load(adaptive=True, max_concurrent=8, initial_concurrent=3)
    assert (s.queue_limit, s.queue_follows_limit, s.oom_cooldown_s) == (30, True, 0.0)
    assert s.oom_window_s == 30.0
    s = _load(adaptive=True, max_concurrent=8, max_queue=50, oom_cooldown=5)
    assert (s.queue_limit, s.queue_follows_limit, s.oom_cooldown_s) == (50, False, 5.0)
    assert _load(adaptive=True, max_concurrent=8).queue_limit == 10  # starts at the minimum


def test_environment_and_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ASR_* variables and a .env file are read; flags win over both."""
    env_file = tmp_path / ".env"
    env_file.write_text("ASR_UPSTREAM_URL=http://file:9000\nASR_MAX_CONCURRENT=3\n")
    monkeypatch.setenv("ASR_MAX_CONCURRENT", "2")
    monkeypatch.setenv("ASR_GATED_PATHS", "/asr, /custom/")
    s = load_settings({}, env_file=env_file)
    assert s.upstream_url == "http://file:9000"
    assert s.max_concurrent == 2  # the environment beats the file
    assert s.gated_paths == ("/asr", "/custom/")
    assert load_settings({"max_concurrent": 5}, env_file=env_file).max_concurrent == 5


def test_oom_patterns_split_on_commas_or_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value with newlines is one pattern a line, so a pattern may contain a comma."""
    monkeypatch.setenv("ASR_OOM_PATTERNS", "a{1,3}b\n^Internal Server Error$")
    assert _load().oom_patterns == ("a{1,3}b", "^Internal Server Error$")
    monkeypatch.setenv("ASR_OOM_PATTERNS", "foo,bar")
    assert _load().oom_patterns == ("foo", "bar")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        (
            "max_concurrent",
            0,
            "ASR_MAX_CONCURRENT=0 is invalid: each limit must be a whole number from 1 to 1024",
        ),
        ("max_concurrent", "abc", "ASR_MAX_CONCURRENT=abc is invalid"),
        (
            "upstream_url",
            "whisper:9000",
            "ASR_UPSTREAM_URL=whisper:9000 is invalid: must be an http://",
        ),
        ("retry_delay", -1, "ASR_RETRY_DELAY=-1 is invalid"),
        ("retry_jitter", 1.5, "ASR_RETRY_JITTER=1.5 is invalid"),
        ("max_queue", -1, "ASR_MAX_QUEUE=-1 is invalid"),
        ("gated_paths", "asr", "ASR_GATED_PATHS"),
        ("oom_patterns", "(unclosed", "invalid OOM pattern '(unclosed'"),
        ("log_format", "xml", "ASR_LOG_FORMAT=xml is invalid"),
        ("port", 70000, "ASR_PORT=70000 is invalid"),
    ],
)
def test_bad_values_name_the_variable_and_rule(field: str, value: object, words: str) -> None:
    """A bad value gives one line naming the variable, the value and the rule."""
    with pytest.raises(SettingsError) as info:
        _load(**{field: value})
    assert len(info.value.lines) == 1
    assert words in info.value.lines[0]


BAD_VALUES: dict[str, list[object]] = {
    "upstream_url": ["whisper:9000", "ftp://w", "http://", "http://w:9000/?q=1"],
    "host": [""],
    "port": [0, 70000, "eighty"],
    "max_concurrent": [0, -1, "two", 2000],
    "max_queue": [-1, "x"],
    "gpu_memory_gib": [0, -1, "x", "18,0", "nan"],
    "task_memory_gib": [-1, "x", "6,-6", "inf"],
    "task_memory_per_minute_gib": [-0.5, "x", "1,y"],
    "backfill_seconds": [-1, "x"],
    "timeout_per_audio_minute": [0, -1, "x"],
    "adaptive": ["sometimes"],
    "min_concurrent": [0, "x"],
    "initial_concurrent": [0, "x"],
    "adaptive_stable_successes": [0, "x"],
    "adaptive_stable_seconds": [-1, "x"],
    "adaptive_fade_seconds": [0, "x"],
    "queue_timeout": [0, -5, "soon"],
    "max_retries": [-1, 1000, "x"],
    "retry_delay": [-1, "x"],
    "retry_jitter": [-0.1, 1, 1.5],
    "retry_on_timeout": ["maybe"],
    "request_timeout": [0, "x"],
    "timeout_hold": [0, -1, "x"],
    "upload_timeout": [0, "x"],
    "task_methods": ["P0ST", "", "GET POST"],
    "oom_window": [-1, "x"],
    "oom_cooldown": [-1, "x"],
    "gated_paths": ["asr", "/asr,v1"],
    "oom_patterns": ["(unclosed", "[a-"],
    "max_body_size": [0, -1, "1GB"],
    "client_body_timeout": [0, "x"],
    "header_timeout": [0, -1, "x", "inf"],
    "spool_memory_size": [-1, "x"],
    "spool_dir": ["/nonexistent/spool"],
    "shutdown_grace": [-1, "x"],
    "health_interval": [0, "x"],
    "health_path": ["health"],
    "health_timeout": [0, "x"],
    "log_format": ["xml"],
    "log_level": ["LOUD"],
    "event_loop": ["trio", ""],
    "redis_url": ["http://redis:6379", "redis:6379", "redis://"],
    "cluster": ["", "a{b}"],
    "redis_lease": [0, 0.5, "x"],
    "redis_timeout": [0, -1, "x"],
}
# Every value is accepted for these: any token string is a valid secret.
ANY_VALUE = {"stats_token", "admin_token"}


def test_every_setting_has_bad_values_tested() -> None:
    """The table below covers every setting that can be wrong."""
    assert set(BAD_VALUES) | ANY_VALUE == set(Settings.model_fields)


@pytest.mark.parametrize(
    ("field", "value"), [(f, v) for f, values in BAD_VALUES.items() for v in values]
)
def test_every_bad_value_is_refused_with_its_name(field: str, value: object) -> None:
    """Each invalid value of each setting is refused with one line naming the variable."""
    base: dict[str, object] = {"upstream_url": "http://whisper:9000"}
    with pytest.raises(SettingsError) as info:
        load_settings({**base, field: value}, env_file=None)
    assert len(info.value.lines) == 1
    line = info.value.lines[0]
    assert line.startswith(f"ASR_{field.upper()}")
    assert "is invalid" in line


def test_a_bad_redis_url_never_shows_its_password() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(
            {"upstream_url": "http://w:9000", "redis_url": "http://:s3cret@redis:6379?password=x"},
            env_file=None,
        )
    line = info.value.lines[0]
    assert "ASR_REDIS_URL" in line
    assert "s3cret" not in line
    assert "password=x" not in line
    assert ":***@redis" in line


@pytest.mark.parametrize(("lease", "timeout"), [(1.2, 0.5), (15, 5)])
def test_the_redis_timeout_must_be_under_a_third_of_the_lease(lease: float, timeout: float) -> None:
    """A Redis call may not take as long as the renewal interval: one line names both."""
    with pytest.raises(SettingsError) as info:
        load_settings(
            {"upstream_url": "http://w:9000", "redis_lease": lease, "redis_timeout": timeout},
            env_file=None,
        )
    assert len(info.value.lines) == 1
    assert "ASR_REDIS_TIMEOUT" in info.value.lines[0]
    assert "ASR_REDIS_LEASE" in info.value.lines[0]


@pytest.mark.parametrize(
    "field", ["max_concurrent", "gpu_memory_gib", "task_memory_gib", "task_memory_per_minute_gib"]
)
def test_a_per_server_list_must_match_the_servers(field: str) -> None:
    """A per-server setting is one value for all or one per server: three values for two
    servers is refused with one line naming the setting and the count."""
    base = {"upstream_url": "http://gpu0:9000,http://gpu1:9000"}
    with pytest.raises(SettingsError) as info:
        load_settings({**base, field: "1,2,3"}, env_file=None)
    [line] = info.value.lines
    assert f"ASR_{field.upper()}=1,2,3 has 3 values for 2 server(s)" in line
    settings = load_settings({**base, field: "1,2"}, env_file=None)
    assert getattr(settings, field) == (1, 2)


def test_missing_upstream_says_what_to_set() -> None:
    """Without ASR_UPSTREAM_URL the error says how to set it."""
    with pytest.raises(SettingsError) as info:
        load_settings({}, env_file=None)
    assert "ASR_UPSTREAM_URL" in info.value.lines[0]
    assert "required" in info.value.lines[0]


def test_token_never_appears_in_public_settings() -> None:
    """The stats token is reported as set, never shown."""
    public = _load(stats_token="s3cret").public_dict()
    assert "s3cret" not in repr(public)
    assert public["stats_token_set"] is True


def test_cli_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    """`gatekeeper serve` with a bad value prints one line naming it and exits 2, no traceback."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gatekeeper",
            "serve",
            "--upstream-url",
            "http://w:9000",
            "--max-concurrent",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "gatekeeper: ASR_MAX_CONCURRENT (--max-concurrent)=0 is invalid: "
        "each limit must be a whole number from 1 to 1024, got '0'"
    ]
