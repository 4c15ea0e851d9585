"""Several Whisper servers behind one queue (#15), over real sockets: per-server limits held at
each server, most-room routing, a dead server's tasks retried elsewhere, a server that comes
back used again, OOMs on one card leaving the others alone, live per-server limits."""

import asyncio
import io
import logging
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatekeeper.app import HEALTH, STATE
from gatekeeper.logs import _EVENT_ATTR, _FIELDS_ATTR, Event
from gatekeeper.policy.outcomes import AttemptOutcome
from gatekeeper.settings import server_name
from gatekeeper.sim.audio import silent_wav
from tests.conftest import GatekeeperFactory, StartSim
from tests.fakes import FakeUpstream
from tests.waiting import until

ADMIN = {"Authorization": "Bearer admin-secret"}


def _form(seconds: float = 1.0) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(
        "audio_file", io.BytesIO(silent_wav(seconds)), filename="a.wav", content_type="audio/wav"
    )
    return form


async def _task(session: aiohttp.ClientSession, base: str, audio: float, **headers: str) -> int:
    """One transcription of `audio` simulated seconds; its status."""
    headers = {"X-Sim-Audio-Seconds": str(audio), **headers}
    async with session.post(f"{base}/asr", data=_form(), headers=headers) as response:
        await response.read()
        return response.status


async def _json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


def _events(caplog: pytest.LogCaptureFixture, event: Event) -> list[dict[str, Any]]:
    return [
        dict(vars(r)[_FIELDS_ATTR])
        for r in caplog.records
        if getattr(r, _EVENT_ATTR, None) is event
    ]


async def test_each_server_keeps_its_own_limit_and_the_books_add_up(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """60 simultaneous tasks over three cards at 3, 2 and 1: each simulator's own counter reaches
    its limit and never passes it; every task is answered 200; what each server did is what
    /stats, /metrics and the log lines say it did; nothing is left held."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    sims = [await start_sim(time_scale=40.0) for _ in range(3)]
    names = [server_name(sim.url) for sim in sims]
    base, _app = await start_gatekeeper(
        ",".join(sim.url for sim in sims), max_concurrent="3,2,1", max_queue=60
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        statuses = await asyncio.gather(*(_task(session, base, 60) for _ in range(60)))
        _, doc = await _json(session, f"{base}/stats")
        health_status, health = await _json(session, f"{base}/health")
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    assert statuses == [200] * 60
    assert [sim.state()["max_active_seen"] for sim in sims] == [3, 2, 1]
    assert [sim.state()["ooms"] for sim in sims] == [0, 0, 0]
    done = [sim.state()["tasks_done"] for sim in sims]
    assert sum(done) == 60
    assert min(done) > 0

    assert doc["max_concurrent"] == 6
    assert doc["max_queue"] == 60
    assert doc["total_tasks"] == 60
    assert doc["active_tasks"] == 0
    servers = doc["upstreams"]
    assert [s["name"] for s in servers] == names
    assert [s["url"] for s in servers] == [sim.url for sim in sims]
    assert [s["max_concurrent"] for s in servers] == [3, 2, 1]
    assert [s["attempts"]["ok"] for s in servers] == done  # per server, the books reconcile
    assert [s["active_tasks"] for s in servers] == [0, 0, 0]
    assert [s["in_flight"] for s in servers] == [0, 0, 0]
    assert all(s["up"] is True and s["usable"] is True for s in servers)

    assert health_status == 200
    assert health["status"] == "ok"
    assert [s["name"] for s in health["upstreams"]] == names
    assert health["upstreams_up"] == 3
    assert "upstream" not in health  # the single-server shape is for one server only

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for name, limit, ok in zip(names, (3, 2, 1), done, strict=True):
        label = (("upstream", name),)
        assert samples[("asr_gatekeeper_upstream_max_concurrent", label)] == limit
        assert samples[("asr_gatekeeper_upstream_up", label)] == 1
        key = ("asr_gatekeeper_upstream_attempts_total", (("outcome", "ok"), *label))
        assert samples[key] == ok
    assert samples[("asr_gatekeeper_max_concurrent", ())] == 6

    starts = _events(caplog, Event.START)
    assert sorted(s["upstream"] for s in starts) == sorted(
        name
        for name, n in zip(names, done, strict=True)
        for _ in range(int(n))  # type: ignore[call-overload]
    )
    finishes = _events(caplog, Event.FINISH)
    assert {f["upstream"] for f in finishes} == set(names)


async def test_a_new_task_goes_to_the_server_with_the_most_room(
    start_gatekeeper: GatekeeperFactory,
) -> None:
    """At limits 1 and 3 the first task goes to the second server (3 free), so does the second
    (2 free against 1); then 1 against 1: the first in the list."""
    first, second = FakeUpstream(), FakeUpstream()
    await first.start()
    await second.start()
    try:
        base, _ = await start_gatekeeper(f"{first.url},{second.url}", max_concurrent="1,3")
        async with aiohttp.ClientSession() as session:
            hold = {"X-Fake-Hold": "hold"}
            tasks = []
            for expected in ((0, 1), (0, 2), (1, 2)):
                tasks.append(asyncio.create_task(session.post(f"{base}/asr", headers=hold)))
                await until(lambda e=expected: (first.active, second.active) == e)  # type: ignore[misc]
            first.release()
            second.release()
            for task in tasks:
                response = await task
                assert response.status == 200
                response.release()
    finally:
        await first.stop()
        await second.stop()


async def test_a_dead_servers_tasks_are_retried_on_another_and_it_is_used_again_when_back(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Two tasks run on the first card when it dies (every connection reset, the port shut):
    both are answered 200 by the second card; the dead card is reported down at once and gets
    no new task while down; started again on its port, it is found up and used again without a
    restart of the gatekeeper."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    dying, other = await start_sim(time_scale=10.0), await start_sim(time_scale=10.0)
    names = [server_name(dying.url), server_name(other.url)]
    base, app = await start_gatekeeper(
        f"{dying.url},{other.url}",
        max_concurrent="2,1",
        retry_delay=0.05,
        retry_jitter=0,
        oom_cooldown=0,
        health_interval=30,  # only the probe after the crash can notice it
    )
    state = app[STATE]
    async with aiohttp.ClientSession() as session:
        await until(lambda: all(s.up for s in state.snapshot().servers))
        running = [asyncio.create_task(_task(session, base, 120)) for _ in range(2)]
        await until(lambda: dying.state()["active_tasks"] == 2)  # most room: both on the first
        port = dying.port
        await dying.stop()
        assert await asyncio.gather(*running) == [200, 200]
        servers = state.snapshot().servers
        assert servers[0].up is False
        assert servers[0].usable is False
        assert sum(servers[0].attempts.values()) == 2  # the two crashed attempts
        assert servers[1].attempts[AttemptOutcome.OK] == 2
        assert other.state()["tasks_done"] == 2
        down = _events(caplog, Event.UPSTREAM_DOWN)
        assert [d["upstream"] for d in down] == [names[0]]
        retries = _events(caplog, Event.RETRY)
        assert [r["upstream"] for r in retries] == [names[0]] * 2
        health_status, health = await _json(session, f"{base}/health")
        assert health_status == 200
        assert health["upstreams_up"] == 1
        assert [u["state"] for u in health["upstreams"]] == ["down", "up"]

        # While it is down a new task waits for the other card rather than going there.
        assert await _task(session, base, 10) == 200
        assert sum(state.snapshot().servers[0].attempts.values()) == 2

        await dying.start(port=port)
        app[HEALTH].check_soon(0)  # rather than wait out the 30-s interval
        await until(lambda: state.snapshot().servers[0].usable)
        assert [u["upstream"] for u in _events(caplog, Event.UPSTREAM_UP)] == [names[0]]
        assert await _task(session, base, 10) == 200
    assert dying.state()["tasks_done"] == 1  # used again: most room (2 against 1)


async def test_an_oom_on_one_card_leaves_the_other_alone(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The fixed mode with the seed's cool-down. The first card fits one 60-s task and is given
    three: its OOMs are its own (count, last OOM, cool-down lines all name it); tasks that start
    on the other card never cool down; every task is answered 200."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    small = await start_sim(time_scale=40.0, total_gib=10.0)  # 4 GiB free: one 60-s task
    big = await start_sim(time_scale=40.0)
    names = [server_name(small.url), server_name(big.url)]
    base, _app = await start_gatekeeper(
        f"{small.url},{big.url}", max_concurrent="3,1", retry_delay=0.2, retry_jitter=0
    )
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(_task(session, base, 60) for _ in range(8)))
        _, doc = await _json(session, f"{base}/stats")
    assert statuses == [200] * 8
    assert small.state()["ooms"] >= 1
    assert big.state()["ooms"] == 0
    first, second = doc["upstreams"]
    assert first["oom_errors"] == small.state()["ooms"]
    assert first["last_oom"] is not None
    assert second["oom_errors"] == 0
    assert second["last_oom"] is None
    assert doc["oom_errors"] == first["oom_errors"]
    cooldowns = _events(caplog, Event.COOLDOWN)
    assert all(c["upstream"] == names[0] for c in cooldowns)
    ooms = _events(caplog, Event.OOM)
    assert ooms
    assert all(o["upstream"] == names[0] for o in ooms)
    started_on_big = {
        s["task_id"] for s in _events(caplog, Event.START) if s["upstream"] == names[1]
    }
    assert started_on_big  # the big card was used, and no task cooled down there
    assert not started_on_big & {c["task_id"] for c in cooldowns}


async def test_an_adaptive_limit_cut_by_ooms_is_only_that_cards(
    start_sim: StartSim, start_gatekeeper: GatekeeperFactory
) -> None:
    """Adaptive mode, both cards started at 3: the small card's OOMs cut its own limit; the big
    card's limit and its change counters stay as they were; all tasks succeed."""
    small = await start_sim(time_scale=40.0, total_gib=10.0)
    big = await start_sim(time_scale=40.0)
    base, app = await start_gatekeeper(
        f"{small.url},{big.url}",
        adaptive=True,
        max_concurrent=3,
        initial_concurrent=3,
        min_concurrent=1,
        retry_delay=0.05,
        retry_jitter=0,
    )
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(_task(session, base, 60) for _ in range(12)))
        _, doc = await _json(session, f"{base}/stats")
    assert statuses == [200] * 12
    assert small.state()["ooms"] >= 1
    assert big.state()["ooms"] == 0
    first, second = doc["upstreams"]
    assert first["max_concurrent"] < 3
    assert first["adaptive"]["limit"] == first["max_concurrent"]
    assert second["max_concurrent"] == 3
    assert second["adaptive"]["limit"] == 3
    snap = app[STATE].snapshot()
    assert sum(snap.servers[1].limit_changes.values()) == 0
    assert sum(snap.servers[0].limit_changes.values()) >= 1
    assert doc["max_concurrent"] == first["max_concurrent"] + 3
    assert doc["adaptive"]["limits"] == {
        first["name"]: first["max_concurrent"],
        second["name"]: 3,
    }


async def test_per_server_limits_change_live(start_gatekeeper: GatekeeperFactory) -> None:
    """PATCH /admin/config with one limit per server: each server's limit, the sum and the queue
    that follows it (10 × the sum when ASR_MAX_QUEUE is not set) change without a restart."""
    first, second = FakeUpstream(), FakeUpstream()
    await first.start()
    await second.start()
    try:
        base, _app = await start_gatekeeper(
            f"{first.url},{second.url}", max_concurrent=2, admin_token="admin-secret"
        )
        async with aiohttp.ClientSession() as session:
            _, doc = await _json(session, f"{base}/stats")
            assert [s["max_concurrent"] for s in doc["upstreams"]] == [2, 2]
            assert doc["max_queue"] == 40
            for body in ({"max_concurrent": [1, 3]}, {"max_concurrent": "1,3"}):
                async with session.patch(
                    f"{base}/admin/config", json=body, headers=ADMIN
                ) as response:
                    assert response.status == 200, await response.text()
                _, doc = await _json(session, f"{base}/stats")
                assert [s["max_concurrent"] for s in doc["upstreams"]] == [1, 3]
                assert (doc["max_concurrent"], doc["max_queue"]) == (4, 40)
            async with session.patch(
                f"{base}/admin/config", json={"max_concurrent": [1, 2, 3]}, headers=ADMIN
            ) as response:
                assert response.status == 400
                assert "one per server" in await response.text()
    finally:
        await first.stop()
        await second.stop()
