"""Numbers in settings are finite and never true/false (issue #13, item 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

from gatekeeper.settings import Settings, SettingsError, load_settings, validate_settings

BASE = {"upstream_url": "http://whisper:9000"}


def _fields_of(*kinds: type) -> list[str]:
    """The settings whose type is one of `kinds` (optional, or one per server, or not)."""
    names = []
    for name, info in Settings.model_fields.items():
        annotation = info.annotation
        if annotation in kinds or any(
            annotation in (kind | None, kind | tuple[kind, ...]) for kind in kinds
        ):
            names.append(name)
    return names


FLOAT_FIELDS = _fields_of(float)
NUMBER_FIELDS = _fields_of(int, float)


def test_the_field_lists_are_not_empty() -> None:
    """The tables below really cover the delays and limits (guards the type lookup)."""
    assert {"retry_delay", "request_timeout", "queue_timeout", "oom_window"} <= set(FLOAT_FIELDS)
    assert {"max_concurrent", "max_queue", "port"} <= set(NUMBER_FIELDS) - set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", "nan", "1e999"])
def test_non_finite_seconds_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, field: str, text: str
) -> None:
    """`ASR_<FLOAT>=inf` (or nan, 1e999) is refused with one line naming the variable."""
    monkeypatch.setenv(f"ASR_{field.upper()}", text)
    with pytest.raises(SettingsError) as info:
        load_settings(BASE, env_file=None)
    [line] = info.value.lines
    assert line.startswith(f"ASR_{field.upper()}={text} is invalid: ")
    assert "finite number" in line


@pytest.mark.parametrize("field", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [True, False])
def test_true_or_false_is_no_number(field: str, value: bool) -> None:
    """A JSON true/false for a number (as a live PATCH sends it) is refused, not read as 1/0."""
    with pytest.raises(SettingsError) as info:
        validate_settings({**BASE, field: value})
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith(f"ASR_{field.upper()}=")
    assert "must be a number, not true or false" in info.value.lines[0]


def test_numbers_as_text_from_the_environment_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment values are text: "3", "2.5" and "1e2" convert as before."""
    monkeypatch.setenv("ASR_MAX_CONCURRENT", "3")
    monkeypatch.setenv("ASR_RETRY_DELAY", "2.5")
    monkeypatch.setenv("ASR_QUEUE_TIMEOUT", "1e2")
    monkeypatch.setenv("ASR_ADAPTIVE", "true")
    settings = load_settings(BASE, env_file=None)
    assert (settings.max_concurrent, settings.retry_delay, settings.queue_timeout) == (3, 2.5, 100)
    assert settings.adaptive is True


def test_cli_exits_2_for_an_infinite_delay(tmp_path: Path) -> None:
    """`ASR_RETRY_DELAY=inf gatekeeper serve` prints the usual one line and exits 2."""
    env = {"PATH": "/usr/bin:/bin", "ASR_RETRY_DELAY": "inf", "ASR_UPSTREAM_URL": "http://w:9000"}
    result = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "serve", "--env-file", "/dev/null"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "gatekeeper: ASR_RETRY_DELAY=inf is invalid: input should be a finite number"
    ]
