"""ASR_EVENT_LOOP: which loop `gatekeeper serve` runs on, and a clear error when it is missing."""

import asyncio
import os
import sys

import pytest

from gatekeeper.cli import main
from gatekeeper.server import EventLoopMissing, loop_factory


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a platform without uvloop: importing it fails."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


def test_auto_and_uvloop_pick_uvloop_when_installed() -> None:
    import uvloop

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop


def test_asyncio_is_pythons_own_loop() -> None:
    assert loop_factory("asyncio") is None


@pytest.mark.usefixtures("no_uvloop")
def test_auto_falls_back_to_pythons_loop_without_uvloop() -> None:
    assert loop_factory("auto") is None


@pytest.mark.usefixtures("no_uvloop")
def test_asking_for_a_missing_uvloop_is_an_error_that_says_what_to_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(EventLoopMissing, match="pip install uvloop"):
        loop_factory("uvloop")
    argv = ["serve", "--upstream-url", "http://127.0.0.1:1", "--env-file", os.devnull]
    assert main([*argv, "--event-loop", "uvloop"]) == 2  # before anything listens
    err = capsys.readouterr().err
    assert "ASR_EVENT_LOOP=uvloop, but uvloop is not installed" in err
    assert "ASR_EVENT_LOOP=auto" in err


def test_the_uvloop_factory_makes_a_working_loop() -> None:
    factory = loop_factory("auto")
    assert factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, result="ran")) == "ran"
        assert type(runner.get_loop()).__module__.startswith("uvloop")
