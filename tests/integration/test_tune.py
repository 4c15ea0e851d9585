"""`gatekeeper tune`: its flags, then real runs against the simulator (rules: test_tune_decide)."""

import argparse
import asyncio
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gatekeeper.commands.tune import run_tune, tune
from gatekeeper.commands.tune.args import TuneConfig, add_tune_arguments, config_from_args
from gatekeeper.sim import Simulator, silent_wav
from tests.conftest import StartSim
from tests.waiting import until

FIVE_MINUTES = 300.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give the Whisper server's URL"),
        (["whisper:9000"], "must start with http"),
        (["http://a", "--upstream-url", "http://b"], "differ"),
        (["http://a", "--durations", "30,x"], "seconds separated by commas"),
        (["http://a", "--durations", "0"], "positive seconds"),
        (["http://a", "--tasks-per-level", "0"], "--tasks-per-level must be >= 1"),
        (["http://a", "--audio-seconds", "30"], "--audio-seconds goes with --audio"),
        (["http://a", "--audio", "/nonexistent.wav"], "cannot read --audio"),
    ],
)
def test_bad_flags_are_refused_with_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flags that cannot work stop the command at once with one line and exit status 2."""
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    assert run_tune(parser.parse_args(argv)) == 2
    assert message in capsys.readouterr().err


def test_audio_file_duration_comes_from_its_header(tmp_path: Path) -> None:
    """A WAV given with --audio is timed from its header; other files need --audio-seconds."""
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    wav = tmp_path / "talk.wav"
    wav.write_bytes(silent_wav(12.5, sample_rate=8_000))
    config = config_from_args(parser.parse_args(["http://w:9000/", "--audio", str(wav)]))
    assert (config.urls, config.audio[0].seconds) == (("http://w:9000",), 12.5)
    mp3 = tmp_path / "talk.mp3"
    mp3.write_bytes(b"ID3" + bytes(1000))
    with pytest.raises(ValueError, match="--audio-seconds"):
        config_from_args(parser.parse_args(["http://w", "--audio", str(mp3)]))
    args = parser.parse_args(["http://w", "--audio", str(mp3), "--audio-seconds", "60"])
    assert config_from_args(args).audio[0].seconds == 60.0


# -- against the simulator ---------------------------------------------------------------------


@pytest.fixture
def sim_time_scale() -> float:
    """Simulators in this module run 200.0× faster than real time."""
    return 200.0


def _config(sim: Simulator, out: Path | None, **overrides: Any) -> TuneConfig:
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    args = parser.parse_args(
        [sim.url, "--durations", str(FIVE_MINUTES), "--tasks-per-level", "6", "--pause", "0"]
    )
    args.out = out
    for name, value in overrides.items():
        setattr(args, name, value)
    return config_from_args(args)


async def _tune(config: TuneConfig, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await tune(config, stdout=out, stderr=err, interactive=False, **kwargs)
    return status, out.getvalue(), err.getvalue()


async def test_default_card_recommends_three_and_stops_at_the_oom(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """On the default card (three 5-minute files fit, a fourth runs out of memory) tune climbs
    1, 2, 3, stops at 4 after one OOM, and recommends 3: the best goodput in its own table."""
    sim = await start_sim()
    status, out, err = await _tune(_config(sim, tmp_path))
    assert status == 0, err
    assert "ASR_MAX_CONCURRENT=3\n" in out
    assert "4 at a time failed (1 OOM in 4 tasks)" in out
    assert "level 4: 3/4 ok" in err  # plain progress lines without a terminal

    [json_file, md_file] = _files(tmp_path)
    report = json.loads(json_file.read_text())
    levels = report["levels"]
    assert [r["level"] for r in levels] == [1, 2, 3, 4]
    assert report["stopped_because"] == "oom"
    assert (levels[3]["oom"], levels[3]["sent"]) == (1, 4)  # no more sends after the OOM
    assert all(r["ok"] == r["sent"] for r in levels[:3])
    goodput = [r["goodput_audio_min_per_min"] for r in levels[:3]]
    assert goodput == sorted(goodput)
    best = max(levels[:3], key=lambda r: r["goodput_audio_min_per_min"])
    assert report["recommendation"]["max_concurrent"] == best["level"] == 3
    assert sim.state()["max_active_seen"] == 4

    markdown = md_file.read_text()
    assert "ASR_MAX_CONCURRENT=3" in markdown
    assert "| 3 | 6 | 6 | 0 |" in markdown
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:3] == ["level", "tasks", "ok"]
    assert "◀ recommended" in table[3]


def _files(directory: Path) -> list[Path]:
    """The result files written, JSON first."""
    return sorted(directory.iterdir(), key=lambda p: p.suffix != ".json")


async def test_half_memory_card_recommends_one(start_sim: StartSim) -> None:
    """With 9 GiB usable only one 5-minute file fits: tune stops at 2 and recommends 1."""
    sim = await start_sim(total_gib=15.0)
    status, out, _ = await _tune(_config(sim, None))
    assert status == 0
    assert "ASR_MAX_CONCURRENT=1\n" in out
    assert "2 at a time failed (1 OOM in 2 tasks)" in out


async def test_busy_server_is_refused_without_yes(start_sim: StartSim, tmp_path: Path) -> None:
    """A server with a task running is loaded only after a yes: --yes, or an answer at a prompt;
    without a terminal to ask, tune refuses with exit status 2."""
    sim = await start_sim(time_scale=1000.0)
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("audio_file", silent_wav(1.0), filename="a.wav")
        hanging = asyncio.create_task(
            session.post(sim.url + "/asr", data=form, headers={"X-Sim-Fail": "hang"})
        )
        await until(lambda: sim.state()["active_tasks"] == 1)
        status, out, err = await _tune(_config(sim, tmp_path))
        assert status == 2
        assert "reports 1 task(s) running" in err
        assert "pass --yes" in err
        assert out == ""
        assert _files(tmp_path) == []
        assert sim.state()["tasks_started"] == 1  # nothing was sent

        asked: list[str] = []

        def refuse(prompt: str) -> bool:
            asked.append(prompt)
            return False

        out_io, err_io = io.StringIO(), io.StringIO()
        config = _config(sim, tmp_path)
        status = await tune(config, stdout=out_io, stderr=err_io, interactive=True, ask=refuse)
        assert (status, asked) == (2, ["Load it anyway? [y/N] "])

        status, out, err = await _tune(_config(sim, None, yes=True, tasks_per_level=1))
        assert status == 0
        assert "ASR_MAX_CONCURRENT=" in out
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging


async def test_unreachable_server_exits_1(tmp_path: Path) -> None:
    """Nothing listening at the URL: one clear line and exit status 1."""
    sim = Simulator()
    await sim.start()
    url = sim.url
    await sim.stop()
    config = TuneConfig(urls=(url,), api="asr", audio=(), out_dir=tmp_path)
    status, _, err = await _tune(config)
    assert status == 1
    assert f"cannot reach {url}" in err


@pytest.mark.parametrize(
    ("api", "path"), [("openai", "/v1/audio/transcriptions"), ("whispercpp", "/inference")]
)
async def test_other_apis_use_their_path_and_field(
    start_sim: StartSim, api: str, path: str
) -> None:
    """--api openai and whispercpp send the audio where those servers expect it."""
    sim = await start_sim(total_gib=15.0, time_scale=2000.0)
    status, out, _ = await _tune(_config(sim, None, api=api, tasks_per_level=2))
    assert status == 0
    assert "ASR_MAX_CONCURRENT=1" in out
    recent = sim.state()["recent"]
    assert isinstance(recent, list)
    assert {r["path"] for r in recent if isinstance(r, dict)} == {path}


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


async def test_progress_is_a_bar_on_a_terminal(start_sim: StartSim) -> None:
    """On a terminal progress is one bar redrawn in place, then one summary line per level."""
    sim = await start_sim(total_gib=15.0, time_scale=2000.0)
    err = _Terminal()
    config = _config(sim, None, tasks_per_level=2)
    assert await tune(config, stdout=io.StringIO(), stderr=err, interactive=False) == 0
    text = err.getvalue()
    assert "\rlevel 1 [############" in text
    assert "2/2  ok 2  oom 0" in text
    assert "task 1/2" not in text  # no per-task lines on a terminal
    assert "\nlevel 2: 1/2 ok" in text
