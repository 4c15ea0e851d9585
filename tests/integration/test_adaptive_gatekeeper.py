"""The adaptive limit at work in the gatekeeper, against the simulator's memory model."""

import asyncio
import io
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gatekeeper.app import PROXY, REGISTRY, STATE
from gatekeeper.logs import _FIELDS_ATTR
from gatekeeper.policy.adaptive import HISTORY_LENGTH
from gatekeeper.settings import server_name
from gatekeeper.sim import SimConfig, Simulator
from gatekeeper.sim.audio import silent_wav
from tests.conftest import GatekeeperFactory

# Five-minute files on the default card: three fit (3 × 6 GiB of 18), a fourth does not.
FIVE_MINUTES = {"X-Sim-Audio-Seconds": "300"}
FAST = {
    "retry_delay": 0.02,
    "retry_jitter": 0,
    "oom_cooldown": 0,
    "adaptive_stable_successes": 3,
    "adaptive_stable_seconds": 0,
    "max_retries": 6,
}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(SimConfig(time_scale=300.0))
    await simulator.start()
    yield simulator
    await simulator.stop()


async def _flood(base: str, n: int, **headers: str) -> list[int]:
    async def one(session: aiohttp.ClientSession) -> int:
        form = aiohttp.FormData()
        form.add_field("audio_file", io.BytesIO(silent_wav(1)), filename="a.wav")
        async with session.post(f"{base}/asr", data=form, headers=headers) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session) for _ in range(n))))


async def test_starting_too_high_comes_down_to_what_fits(
    sim: Simulator, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Started at 8 on a card that fits 3, the first OOMs cut the limit at once; every task
    still succeeds (the cut frees memory for the retries), and the limit ends at what fits or
    one above it (probing again; a ceiling needs repeated OOMs of new tasks)."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    base, app = await start_gatekeeper(
        sim.url, adaptive=True, min_concurrent=1, max_concurrent=8, initial_concurrent=8, **FAST
    )
    statuses = await _flood(base, 40, **FIVE_MINUTES)
    assert statuses.count(200) == 40
    adaptive = app[PROXY].adaptive
    assert adaptive is not None
    assert adaptive.limit <= 4
    assert adaptive.ceiling is None or adaptive.ceiling <= 3
    assert sim.state()["ooms"] >= 1
    reasons = [c.reason for c in adaptive.history]
    assert any(r.startswith("oom") for r in reasons)
    lines = [r for r in caplog.records if "调整并发" in r.getMessage()]
    # Every change is logged; /stats keeps the last HISTORY_LENGTH of them.
    assert len(lines) == len(adaptive.history) or len(adaptive.history) == HISTORY_LENGTH
    first = vars(lines[0])[_FIELDS_ATTR]  # the first OOM cut at once: 8 × 0.7
    assert (first["old"], first["new"], first["reason"][:7]) == (8, 5, "oom_at_")
    assert app[REGISTRY].get_sample_value(
        "asr_gatekeeper_limit_changes_total", {"reason": "oom", "upstream": server_name(sim.url)}
    ) == sum(1 for r in reasons if r.startswith("oom"))
    gate = app[STATE].snapshot().gate
    assert gate.limit == adaptive.limit
    assert gate.max_queue == 10 * adaptive.limit  # ASR_MAX_QUEUE unset: the queue follows


async def test_starting_low_climbs_then_learns_the_ceiling(
    sim: Simulator, start_gatekeeper: GatekeeperFactory
) -> None:
    """Started at 1 with a busy queue, stable stretches raise it; OOMs at 4 bring it back."""
    base, app = await start_gatekeeper(
        sim.url,
        adaptive=True,
        min_concurrent=1,
        max_concurrent=8,
        initial_concurrent=1,
        max_queue=60,  # a fixed queue: by default it would follow the limit (10 at 1)
        **FAST,
    )
    statuses = await _flood(base, 60, **FIVE_MINUTES)
    assert statuses.count(200) == 60
    adaptive = app[PROXY].adaptive
    assert adaptive is not None
    rises = [c for c in adaptive.history if c.reason.startswith("stable")]
    assert rises
    assert rises[0].old == 1
    assert rises[0].new == 2
    assert max(c.new for c in adaptive.history) >= 3
    assert sim.state()["max_active_seen"] <= 4  # it probed 4 at most, never further
    assert adaptive.limit <= 3


async def test_client_errors_say_nothing_about_the_gpu(
    sim: Simulator, start_gatekeeper: GatekeeperFactory
) -> None:
    """Tasks the Whisper server refuses as bad requests never move the adaptive limit."""
    base, app = await start_gatekeeper(
        sim.url,
        adaptive=True,
        min_concurrent=1,
        max_concurrent=4,
        initial_concurrent=2,
        max_queue=30,
        **FAST,
    )
    statuses = await _flood(base, 30, **{"X-Sim-Status": "422"})
    assert statuses == [422] * 30
    adaptive = app[PROXY].adaptive
    assert adaptive is not None
    assert adaptive.limit == 2
    assert adaptive.history == ()


async def test_stats_show_the_adaptive_state(
    sim: Simulator, start_gatekeeper: GatekeeperFactory
) -> None:
    """/stats carries the current limit and the last changes with reasons and times."""
    base, _ = await start_gatekeeper(
        sim.url, adaptive=True, min_concurrent=1, max_concurrent=8, initial_concurrent=8, **FAST
    )
    await _flood(base, 20, **FIVE_MINUTES)
    async with aiohttp.ClientSession() as session, session.get(f"{base}/stats") as response:
        doc = await response.json()
    adaptive = doc["adaptive"]
    assert adaptive["limit"] == doc["max_concurrent"]
    assert (adaptive["minimum"], adaptive["maximum"]) == (1, 8)
    assert adaptive["changes"]
    change = adaptive["changes"][0]
    assert change["old"] == 8
    assert change["reason"].startswith("oom")
    assert "time" in change
    assert "seconds_ago" in change
