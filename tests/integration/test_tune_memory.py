"""`gatekeeper tune` recommends memory figures (#16), over real sockets against simulators:
ASR_GPU_MEMORY_GIB, ASR_TASK_MEMORY_GIB and ASR_TASK_MEMORY_PER_MINUTE_GIB beside the count, in
the terminal, the JSON and the Markdown, per card for a pool.
(The rules: test_tune_decide_memory.)"""

import argparse
import io
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gatekeeper.commands.tune import tune
from gatekeeper.commands.tune.args import TuneConfig, add_tune_arguments, config_from_args
from gatekeeper.sim import Simulator
from tests.conftest import StartSim

# The simulator's default card: 24 GiB with 6 reserved, a task 2 GiB + 0.8 GiB per audio minute.
# A 1-minute file needs 2.8 GiB: 6 fit in 18 GiB, 7 do not; a 5-minute file 6 GiB: 3 fit, 4 not.
TRUE_BASE, TRUE_PER_MINUTE = 2.0, 0.8


@pytest.fixture
def sim_time_scale() -> float:
    """200× real time, as in test_tune.py: faster, and a loaded machine may start a level's
    tasks so late that they never overlap (and a level that should OOM would not)."""
    return 200.0


def _config(urls: Sequence[str], out: Path | None, *extra: str) -> TuneConfig:
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    argv = [",".join(urls), "--tasks-per-level", "6", "--pause", "0", *extra]
    args = parser.parse_args(argv)
    args.out = out
    return config_from_args(args)


async def _tune(config: TuneConfig) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await tune(config, stdout=out, stderr=err, interactive=False)
    return status, out.getvalue(), err.getvalue()


def _written(directory: Path) -> tuple[dict[str, Any], str]:
    [json_file] = directory.glob("*.json")
    [md_file] = directory.glob("*.md")
    report: dict[str, Any] = json.loads(json_file.read_text())
    return report, md_file.read_text()


async def test_two_lengths_on_the_default_card_recommend_near_the_true_figures(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """--durations 60,300: the count climb as before (the two lengths mixed), then each length
    alone until it runs out of memory: 1 minute 6 at once and 7 ran out, 5 minutes 3 and 4.
    Costed at what fitted (18 ÷ 6 = 3 GiB, 18 ÷ 3 = 6 GiB) that is 2.25 + 0.75 GiB per minute.

    The tolerance against the truth (2 + 0.8) is what whole tasks can resolve: a 1-minute file
    is known only to cost more than 18 ÷ 7 = 2.57 and at most 3 GiB; the truth, 2.8, is 0.2
    below the top, which over the 4 minutes between the lengths is 0.05 GiB per minute and
    0.25 GiB on the base. The 5-minute file is exactly at the top (three fill the card)."""
    sim = await start_sim()
    status, out, err = await _tune(_config([sim.url], tmp_path, "--durations", "60,300"))
    assert status == 0, err
    assert "\nASR_MAX_CONCURRENT=" in out  # the count recommendation is still there
    line = (
        "ASR_GPU_MEMORY_GIB=18 ASR_TASK_MEMORY_GIB=2.25 ASR_TASK_MEMORY_PER_MINUTE_GIB=0.75 "
        "ASR_MAX_CONCURRENT=6"
    )
    assert f"\n{line}\n" in out
    assert "(18 GiB free, from /sim/state; ASR_MAX_CONCURRENT then only caps)" in out
    assert "memory: 60 s files alone, climbing until they run out of memory" in err
    assert "memory: 300 s files alone" in err

    report, markdown = _written(tmp_path)
    memory = report["recommendation"]["memory"]
    assert memory["task_memory_gib"] == pytest.approx(TRUE_BASE, abs=0.25 + 1e-9)
    assert memory["task_memory_per_minute_gib"] == pytest.approx(TRUE_PER_MINUTE, abs=0.05 + 1e-9)
    assert (memory["task_memory_gib"], memory["task_memory_per_minute_gib"]) == (2.25, 0.75)
    assert (memory["gpu_memory_gib"], memory["gpu_memory_from"]) == (18.0, "/sim/state")
    assert memory["settings"] == line
    one, five = memory["durations"]
    assert (one["audio_seconds"], one["fitted"], one["oom_at"]) == (60.0, 6, 7)
    assert (five["audio_seconds"], five["fitted"], five["oom_at"]) == (300.0, 3, 4)
    assert [r["level"] for r in one["levels"]] == [1, 2, 3, 4, 5, 6, 7]  # past "no gain"
    assert [r["oom"] for r in five["levels"]] == [0, 0, 0, 1]
    assert f"```sh\n{line}\n```" in markdown
    assert "| 60 s | 6 | 7 | out of GPU memory |" in markdown

    # With these figures the gatekeeper admits exactly what the card holds at each length.
    base, per_minute = 2.25, 0.75
    for minutes, fit in ((1, 6), (5, 3)):
        assert (
            fit * (base + per_minute * minutes) <= 18.0 < (fit + 1) * (base + per_minute * minutes)
        )


async def test_one_length_needs_no_more_load_and_gives_a_base_only(start_sim: StartSim) -> None:
    """One length (the default 5 minutes): the figures come from the count climb itself,
    base = 18 GiB ÷ 3, nothing per minute; no task is sent beyond that climb's."""
    sim = await start_sim()
    status, out, err = await _tune(_config([sim.url], None, "--durations", "300"))
    assert status == 0, err
    assert "ASR_MAX_CONCURRENT=3\n" in out
    assert (
        "\nASR_GPU_MEMORY_GIB=18 ASR_TASK_MEMORY_GIB=6 ASR_TASK_MEMORY_PER_MINUTE_GIB=0 "
        "ASR_MAX_CONCURRENT=3\n"
    ) in out
    assert "one length only" in out
    assert "memory:" not in err
    # warm-up 1 + levels 1, 2, 3 (6 tasks each) + level 4 (stopped after its OOM: 4 sent)
    assert sim.state()["tasks_started"] == 1 + 6 + 6 + 6 + 4


async def test_the_given_budget_wins_over_the_simulators(start_sim: StartSim) -> None:
    """--gpu-memory-gib is the operator's word for what the card leaves to tasks: the figures
    are in its terms (three 5-minute files fitted: 12 ÷ 3 = 4 GiB each)."""
    sim = await start_sim()
    status, out, _ = await _tune(
        _config([sim.url], None, "--durations", "300", "--gpu-memory-gib", "12")
    )
    assert status == 0
    assert "ASR_GPU_MEMORY_GIB=12 ASR_TASK_MEMORY_GIB=4 " in out
    assert "12 GiB free, from --gpu-memory-gib;" in out


@pytest.fixture
async def real_server(start_sim: StartSim) -> AsyncIterator[str]:
    """A Whisper server that is not the simulator: POST /asr is served (by a simulator behind
    it), /sim/state is not there, so nothing says how much memory the card leaves to tasks."""
    sim = await start_sim()
    async with aiohttp.ClientSession() as session:

        async def asr(request: web.Request) -> web.Response:
            headers = {"Content-Type": request.headers["Content-Type"]}
            body = io.BytesIO(await request.read())
            async with session.post(sim.url + "/asr", data=body, headers=headers) as upstream:
                return web.Response(
                    status=upstream.status,
                    body=await upstream.read(),
                    content_type=upstream.content_type,
                )

        async def root(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/asr", asr)
        app.router.add_get("/", root)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def test_a_real_server_cannot_tell_its_memory_so_the_operator_must(
    real_server: str, tmp_path: Path
) -> None:
    """Without --gpu-memory-gib and without /sim/state there is no line to copy: the figures
    come per GiB of the card's free memory, and the operator is told to give it."""
    status, out, err = await _tune(_config([real_server], tmp_path, "--durations", "60,300"))
    assert status == 0, err
    assert "the card's free memory is unknown; give --gpu-memory-gib" in out
    assert "ASR_TASK_MEMORY_GIB = 0.125 × it" in out  # 2.25 GiB of 18
    assert "ASR_GPU_MEMORY_GIB=" not in out
    memory = _written(tmp_path)[0]["recommendation"]["memory"]
    assert (memory["gpu_memory_gib"], memory["settings"]) == (None, None)
    assert memory["per_gib_of_budget"]["task_memory_gib"] == pytest.approx(2.25 / 18)
    assert memory["per_gib_of_budget"]["task_memory_per_minute_gib"] == round(0.75 / 18, 6)


async def test_a_pool_gets_memory_figures_per_card(start_sim: StartSim, tmp_path: Path) -> None:
    """Two cards, 24 and 15 GiB (18 and 9 GiB free): each card's figures, then the pool's line
    with one value per card. On the small card a 5-minute file fits only alone, so its cost is
    known only between 4.5 and 9 GiB: it is costed 9 (the safe end), hence the steep line."""
    sims: list[Simulator] = [await start_sim(total_gib=24.0), await start_sim(total_gib=15.0)]
    urls = [sim.url for sim in sims]
    status, out, err = await _tune(_config(urls, tmp_path, "--durations", "60,300"))
    assert status == 0, err
    line = (
        "ASR_GPU_MEMORY_GIB=18,9 ASR_TASK_MEMORY_GIB=2.25,1.5 "
        "ASR_TASK_MEMORY_PER_MINUTE_GIB=0.75,1.5 ASR_MAX_CONCURRENT=6,3"
    )
    assert f"\n{line}\n" in out
    sections = out.split("== ")[1:]
    assert "by memory: 18 GiB free (from /sim/state); a task 2.25 GiB + 0.75 GiB" in sections[0]
    assert "by memory: 9 GiB free (from /sim/state); a task 1.5 GiB + 1.5 GiB" in sections[1]
    assert "5 min fitted only alone, which says little" in sections[1]
    for section in sections:
        assert "ASR_MAX_CONCURRENT=" not in section.split("Pool of")[0]  # no line per card

    report, markdown = _written(tmp_path)
    pool = report["recommendation"]["memory"]
    assert pool == {
        "gpu_memory_gib": [18.0, 9.0],
        "task_memory_gib": [2.25, 1.5],
        "task_memory_per_minute_gib": [0.75, 1.5],
        "max_concurrent": [6, 3],
        "settings": line,
    }
    assert [c["recommendation"]["memory"]["max_concurrent"] for c in report["cards"]] == [6, 3]
    assert markdown.count("#### By GPU memory") == 2
    assert f"```sh\n{line}\n```" in markdown
