"""`gatekeeper tune` with several Whisper servers (#15): each card measured in turn, alone, over
real sockets against simulators with different memory; one recommendation per card and the
pool's `ASR_MAX_CONCURRENT=a,b,c`."""

import argparse
import asyncio
import contextlib
import io
import json
import sys
from collections.abc import AsyncIterator, Sequence
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
# A 5-minute file needs 6 GiB on the simulated card, 6 GiB of it are reserved: 24 GiB fits
# three at a time, 18 GiB two, 15 GiB one, 11 GiB none.
CARDS_3_2_1 = (24.0, 18.0, 15.0)


@pytest.fixture
def sim_time_scale() -> float:
    """Simulators in this module run 200× faster than real time (as in test_tune.py: faster, and
    a loaded machine may start a level's tasks so late that they never overlap)."""
    return 200.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    return parser


def _config(urls: Sequence[str], out: Path | None, **overrides: Any) -> TuneConfig:
    args = _parser().parse_args(
        [",".join(urls), "--durations", str(FIVE_MINUTES), "--tasks-per-level", "4", "--pause", "0"]
    )
    args.out = out
    for name, value in overrides.items():
        setattr(args, name, value)
    return config_from_args(args)


async def _tune(config: TuneConfig) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await tune(config, stdout=out, stderr=err, interactive=False)
    return status, out.getvalue(), err.getvalue()


def _written(directory: Path) -> tuple[dict[str, Any], str]:
    """The one run's results: its JSON report and its Markdown page."""
    [json_file] = directory.glob("*.json")
    [md_file] = directory.glob("*.md")
    report: dict[str, Any] = json.loads(json_file.read_text())
    return report, md_file.read_text()


async def _cards(start_sim: StartSim, memory: Sequence[float]) -> list[Simulator]:
    return [await start_sim(total_gib=gib) for gib in memory]


@contextlib.asynccontextmanager
async def _busy_cards_seen(sims: Sequence[Simulator]) -> AsyncIterator[list[int]]:
    """Watch the cards while tune runs; yields the list of how many were busy at once, each
    time that changed (an observer only: tune's own steps are not timed by it)."""
    seen: list[int] = [0]

    async def watch() -> None:
        while True:
            busy = sum(1 for sim in sims if sim.state()["active_tasks"])
            if busy != seen[-1]:
                seen.append(busy)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# -- the flags ------------------------------------------------------------------------------------


def test_several_urls_as_a_comma_list_repeated_or_the_flag() -> None:
    """Several servers come as a comma list (as in ASR_UPSTREAM_URL), as several URLs, or in
    --upstream-url; the order is kept and trailing slashes dropped."""
    want = ("http://gpu0:9000", "http://gpu1:9000", "http://gpu2:9000")
    for argv in (
        ["http://gpu0:9000/,http://gpu1:9000, http://gpu2:9000"],
        ["http://gpu0:9000", "http://gpu1:9000,http://gpu2:9000/"],
        ["--upstream-url", "http://gpu0:9000,http://gpu1:9000,http://gpu2:9000"],
        ["http://gpu0:9000,http://gpu1:9000,http://gpu2:9000", "--upstream-url", ",".join(want)],
    ):
        config = config_from_args(_parser().parse_args(argv))
        assert (config.urls, config.pool) == (want, True), argv
    one = config_from_args(_parser().parse_args(["http://gpu0:9000"]))
    assert (one.urls, one.pool) == (("http://gpu0:9000",), False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["http://gpu0:9000,gpu1:9000"], "must start with http"),
        (["http://gpu0:9000", "http://gpu0:9000/"], "listed twice: gpu0:9000"),
        (["http://a:1,http://b:1", "--upstream-url", "http://b:1,http://a:1"], "differ"),
        ([","], "give the Whisper server's URL"),
    ],
)
def test_bad_server_lists_are_refused_with_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A list that cannot be measured stops the command at once, one line, exit status 2."""
    assert run_tune(_parser().parse_args(argv)) == 2
    assert message in capsys.readouterr().err


# -- against simulated cards -----------------------------------------------------------------------


async def test_each_card_is_measured_alone_and_the_pool_gets_one_value_per_card(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """Three cards (24, 18 and 15 GiB) are measured one after the other, never two at once:
    3, 2 and 1 at a time, then `ASR_MAX_CONCURRENT=3,2,1` in ASR_UPSTREAM_URL's order; the JSON
    and the Markdown carry each card's levels and the pool's settings."""
    sims = await _cards(start_sim, CARDS_3_2_1)
    urls = [sim.url for sim in sims]
    async with _busy_cards_seen(sims) as seen:
        status, out, err = await _tune(_config(urls, tmp_path))
    assert status == 0, err
    assert max(seen) == 1  # each card alone
    assert [sim.state()["max_active_seen"] for sim in sims] == [4, 3, 2]  # each stopped at an OOM

    names = [url.removeprefix("http://") for url in urls]
    sections = out.split("== ")[1:]
    assert [s.split(" ", 1)[0] for s in sections] == names
    for section, name, limit in zip(sections, names, (3, 2, 1), strict=True):
        assert f"\n{name}: {limit} at a time (its value in the pool's" in section
        assert "ASR_MAX_CONCURRENT=" not in section.split("Pool of")[0]  # no line to copy
        assert f"{limit + 1} at a time failed (1 OOM in {limit + 1} tasks)" in section
    assert f"ASR_UPSTREAM_URL={','.join(urls)}\n" in out
    assert "\nASR_MAX_CONCURRENT=3,2,1\n" in out
    assert f"Pool of 3 cards ({names[0]} 3, {names[1]} 2, {names[2]} 1)" in out
    for number, name in enumerate(names, 1):
        assert f"card {number}/3: {name}" in err

    report, markdown = _written(tmp_path)
    assert report["urls"] == urls
    assert [c["name"] for c in report["cards"]] == names
    assert [c["recommendation"]["max_concurrent"] for c in report["cards"]] == [3, 2, 1]
    assert [[r["level"] for r in c["levels"]] for c in report["cards"]] == [
        [1, 2, 3, 4],
        [1, 2, 3],
        [1, 2],
    ]
    assert {c["stopped_because"] for c in report["cards"]} == {"oom"}
    assert report["recommendation"] == {
        "max_concurrent": [3, 2, 1],
        "asr_upstream_url": ",".join(urls),
        "asr_max_concurrent": "3,2,1",
        "memory": {  # one length: 5-minute files costed at what fitted, nothing per minute
            "gpu_memory_gib": [18.0, 12.0, 9.0],
            "task_memory_gib": [6.0, 6.0, 9.0],
            "task_memory_per_minute_gib": [0.0, 0.0, 0.0],
            "max_concurrent": [3, 2, 1],
            "settings": "ASR_GPU_MEMORY_GIB=18,12,9 ASR_TASK_MEMORY_GIB=6,6,9 "
            "ASR_TASK_MEMORY_PER_MINUTE_GIB=0 ASR_MAX_CONCURRENT=3,2,1",
        },
    }
    assert [line for line in markdown.splitlines() if line.startswith("## ")] == [
        *(f"## {name} (`{url}`)" for name, url in zip(names, urls, strict=True)),
        "## The pool",
    ]
    assert markdown.count("### Recommendation") == 3
    assert "\n2 at a time on this card.\n" in markdown
    assert "ASR_MAX_CONCURRENT=3,2,1\n```" in markdown


async def test_a_card_that_fits_no_task_leaves_the_pool_without_a_setting(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """A card too small for even one task (its warm-up runs out of memory) is reported and the
    others are still measured; no pool setting is guessed for it, and the exit status is 1."""
    sims = await _cards(start_sim, (11.0, 15.0))
    status, out, err = await _tune(_config([sim.url for sim in sims], tmp_path))
    assert status == 1
    small, good = (sim.url.removeprefix("http://") for sim in sims)
    assert f"the warm-up task on {sims[0].url} failed (HTTP 500, oom)" in err
    assert f"Pool of 2 cards ({small} -, {good} 1)" in out
    assert f"no limit for {small}" in out
    assert f"\n{good}: 1 at a time" in out  # the good card's own recommendation
    assert f"\nno recommendation for {small}\n" in out
    assert "ASR_MAX_CONCURRENT=" not in out
    assert sims[1].state()["tasks_started"] > 1  # measured after the failed card

    report, markdown = _written(tmp_path)
    assert report["cards"][0]["stopped_because"] == "warm_up_failed"
    assert report["cards"][0]["levels"] == []
    assert report["recommendation"]["max_concurrent"] == [None, 1]
    assert report["recommendation"]["asr_max_concurrent"] is None
    assert "No level measured." in markdown


async def test_an_unreachable_card_stops_the_run_before_any_card_is_loaded(
    start_sim: StartSim,
) -> None:
    """Every card is checked before the first is loaded: one that cannot be reached ends the
    run with status 1 and nothing sent to the others."""
    up = await start_sim()
    gone = Simulator()
    await gone.start()
    gone_url = gone.url
    await gone.stop()
    status, out, err = await _tune(_config([up.url, gone_url], None))
    assert status == 1
    assert f"cannot reach {gone_url}" in err
    assert out == ""
    assert up.state()["tasks_started"] == 0


async def test_a_busy_card_is_named_and_refused_without_yes(start_sim: StartSim) -> None:
    """A card with a task running stops the whole run (without a terminal to ask and without
    --yes): the busy card is named and no card is loaded."""
    sims = await _cards(start_sim, (24.0, 24.0))
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("audio_file", silent_wav(1.0), filename="a.wav")
        hanging = asyncio.create_task(
            session.post(sims[1].url + "/asr", data=form, headers={"X-Sim-Fail": "hang"})
        )
        await until(lambda: sims[1].state()["active_tasks"] == 1)
        status, out, err = await _tune(_config([sim.url for sim in sims], None))
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
    assert status == 2
    assert f"{sims[1].url}/sim/state reports 1 task(s) running" in err
    assert sims[0].url + "/sim/state" not in err
    assert "pass --yes" in err
    assert out == ""
    assert [sim.state()["tasks_started"] for sim in sims] == [0, 1]


async def test_the_command_line_takes_a_comma_list(start_sim: StartSim, tmp_path: Path) -> None:
    """`python -m gatekeeper tune URL0,URL1 …` in its own process: a recommendation per card and
    the pool's line, exit status 0."""
    sims = await _cards(start_sim, (18.0, 15.0))
    urls = ",".join(sim.url for sim in sims)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatekeeper",
        "tune",
        urls,
        *("--durations", str(FIVE_MINUTES), "--tasks-per-level", "2", "--pause", "0"),
        *("--out", str(tmp_path)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert f"ASR_UPSTREAM_URL={urls}\n" in text
    assert "ASR_MAX_CONCURRENT=2,1\n" in text
    assert _written(tmp_path)[0]["recommendation"]["asr_max_concurrent"] == "2,1"
