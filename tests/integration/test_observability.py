"""What ops see: /stats, /metrics, /health and the log lines, all from one snapshot."""

import asyncio
import json
import logging
import re
from datetime import datetime

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatekeeper.app import HEALTH, REGISTRY, STATE
from gatekeeper.clock import FakeClock
from gatekeeper.logs import configure_logging
from gatekeeper.sim import SimConfig, Simulator
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.waiting import until

SEED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "max_concurrent": int,
    "active_tasks": int,
    "queued_tasks": int,
    "total_tasks": int,
    "failed_tasks": int,
    "rejected_tasks": int,
    "oom_errors": int,
    "last_oom": (str, type(None)),
    "success_rate": str,
    "queue_usage": str,
}


async def _mixed_traffic(base: str, upstream: FakeUpstream) -> None:
    """Success, OOM-then-success, failure after retries, a 4xx, a held success, a refusal."""
    async with aiohttp.ClientSession() as session:
        for script, rid in (("ok", "a"), ("oom,ok", "b"), ("500", "c"), ("422", "d")):
            async with session.post(
                f"{base}/asr", data=b"x", headers={"X-Fake-Script": script, "X-Request-ID": rid}
            ) as response:
                await response.read()
        held = asyncio.create_task(
            session.post(f"{base}/asr", data=b"x", headers={"X-Fake-Hold": "h"})
        )
        await upstream.wait_active(1)
        async with session.post(f"{base}/asr", data=b"x") as response:
            assert response.status == 503
        upstream.release("h")
        (await held).release()


async def test_stats_has_the_seed_fields_with_exact_types(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """/stats starts with the seed's ten fields, with the SPEC's types and formats."""
    clock = FakeClock()
    base, _ = await start_gatekeeper(
        upstream.url, clock=clock, max_concurrent=1, max_queue=0, max_retries=1
    )
    await _mixed_traffic(base, upstream)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/stats") as response:
            assert response.status == 200
            doc = await response.json()
        async with session.get(f"{base}/api/recordings/stats/asr-concurrency") as response:
            alias = await response.json()
    assert list(doc)[:10] == list(SEED_FIELDS)
    for name, kind in SEED_FIELDS.items():
        assert isinstance(doc[name], kind), name
    assert doc["max_concurrent"] == 1
    assert (doc["total_tasks"], doc["failed_tasks"], doc["rejected_tasks"]) == (5, 1, 1)
    assert doc["oom_errors"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", doc["last_oom"])
    assert doc["last_oom"] == datetime.fromtimestamp(clock.epoch_offset + 1000).isoformat()
    assert doc["success_rate"] == "75.0%"  # 3 succeeded, 1 failed; the 4xx is neither
    assert doc["queue_usage"] == "0/0 (100%)"
    assert doc["succeeded_tasks"] == 3
    assert doc["client_error_tasks"] == 1
    assert doc["retries"] == {"oom": 1, "error": 1}
    assert doc["settings"]["max_retries"] == 1
    alias.pop("uptime_seconds"), doc.pop("uptime_seconds")
    assert alias == doc


async def test_success_rate_before_any_task_is_100_percent(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A fresh gatekeeper reports "100.0%", last_oom null and an empty queue."""
    base, _ = await start_gatekeeper(upstream.url, max_concurrent=2)
    async with aiohttp.ClientSession() as session, session.get(f"{base}/stats") as response:
        doc = await response.json()
    assert doc["success_rate"] == "100.0%"
    assert doc["last_oom"] is None
    assert doc["queue_usage"] == "0/20 (0%)"


async def test_stats_token_is_required_and_never_shown(
    upstream: FakeUpstream,
    start_gatekeeper: GatekeeperFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With ASR_STATS_TOKEN, /stats needs the Bearer token; the token appears nowhere."""
    caplog.set_level(logging.DEBUG)
    base, _ = await start_gatekeeper(upstream.url, stats_token="s3cret-token")
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            async with session.get(f"{base}/stats", headers=headers) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                body = await response.text()
                assert json.loads(body)["error"] == "unauthorized"
                assert "s3cret" not in body
        good = {"Authorization": "Bearer s3cret-token"}
        async with session.get(f"{base}/api/recordings/stats/asr-concurrency", headers=good) as r:
            assert r.status == 200
            body = await r.text()
    assert "s3cret" not in body
    assert json.loads(body)["settings"]["stats_token_set"] is True
    assert all("s3cret" not in record.getMessage() for record in caplog.records)


async def test_metrics_agree_with_stats(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Every counter and gauge in /metrics equals the matching /stats number."""
    base, app = await start_gatekeeper(
        upstream.url, clock=FakeClock(), max_concurrent=1, max_queue=0, max_retries=1
    )
    await _mixed_traffic(base, upstream)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        async with session.get(f"{base}/stats") as response:
            doc = await response.json()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[("asr_gatekeeper_" + name, tuple(sorted(labels.items())))]

    assert value("max_concurrent") == doc["max_concurrent"]
    assert value("active_tasks") == doc["active_tasks"] == 0
    assert value("tasks_total", outcome="failed") == doc["failed_tasks"]
    assert value("tasks_total", outcome="success") == doc["succeeded_tasks"]
    assert value("rejected_total", reason="queue_full") == doc["rejected_tasks"]
    (server,) = doc["upstreams"]  # one Whisper server: its series carry its host:port
    name = server["name"]
    assert value("oom_errors_total", upstream=name) == doc["oom_errors"] == server["oom_errors"]
    assert value("upstream_attempts_total", upstream=name, outcome="oom") == 1
    assert value("upstream_max_concurrent", upstream=name) == doc["max_concurrent"]
    assert value("retries_total", outcome="error") == 1
    assert value("queue_wait_seconds_count") == 5  # every admitted task got a slot
    assert value("task_duration_seconds_count") == 5
    assert value("last_oom_timestamp_seconds", upstream=name) > 0
    registry = app[REGISTRY]
    labels = {"upstream": name}
    assert registry.get_sample_value("asr_gatekeeper_oom_errors_total", labels) == doc["oom_errors"]
    assert registry.get_sample_value("asr_gatekeeper_upstream_up", labels) in (0.0, 1.0)


async def test_registries_are_per_app(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Two gatekeepers in one process keep separate numbers (no global registry)."""
    base1, app1 = await start_gatekeeper(upstream.url, max_concurrent=3)
    _, app2 = await start_gatekeeper(upstream.url, max_concurrent=5)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base1}/asr", data=b"x") as response:
            assert response.status == 200
    assert app1[REGISTRY].get_sample_value("asr_gatekeeper_max_concurrent") == 3
    assert app2[REGISTRY].get_sample_value("asr_gatekeeper_max_concurrent") == 5
    labels = {"outcome": "success"}
    assert app1[REGISTRY].get_sample_value("asr_gatekeeper_tasks_total", labels) == 1
    assert app2[REGISTRY].get_sample_value("asr_gatekeeper_tasks_total", labels) == 0


async def test_health_follows_the_upstream(start_gatekeeper: GatekeeperFactory) -> None:
    """/health is 200 while the Whisper server accepts connections and 503 when it is gone."""
    sim = Simulator(SimConfig())
    await sim.start()
    clock = FakeClock()  # the next probe is due when the test moves the clock
    base, app = await start_gatekeeper(sim.url, clock=clock)
    async with aiohttp.ClientSession() as session:
        await until(lambda: app[STATE].snapshot().upstream_up is True)
        async with session.get(f"{base}/health") as response:
            assert response.status == 200
            doc = await response.json()
        assert doc["status"] == "ok"
        assert doc["upstream"]["state"] == "up"
        assert doc["upstream"]["checked_at"] is not None
        await sim.stop()
        clock.advance(app[HEALTH][0].interval)
        await until(lambda: app[STATE].snapshot().upstream_up is False)
        async with session.get(f"{base}/health") as response:
            assert response.status == 503
            doc = await response.json()
    assert doc["status"] == "degraded"
    assert doc["upstream"]["state"] == "down"
    assert doc["upstream"]["error"]
    assert doc["upstreams"][0]["state"] == "down"
    labels = {"upstream": doc["upstreams"][0]["name"]}
    assert app[REGISTRY].get_sample_value("asr_gatekeeper_upstream_up", labels) == 0


@pytest.mark.parametrize("health_path", [None, "/health"])
async def test_busy_server_is_not_called_down(
    start_gatekeeper: GatekeeperFactory, health_path: str | None
) -> None:
    """A server whose health path stalls while it transcribes is reported up (TCP) or busy."""
    sim = Simulator(SimConfig(stall_when_busy=True, time_scale=2.0))
    await sim.start()
    clock = FakeClock()  # the probe's interval passes when the test says so
    try:
        base, app = await start_gatekeeper(
            sim.url,
            clock=clock,
            health_path=health_path,
            health_timeout=0.2,
            health_interval=0.05,
        )
        probe = app[HEALTH][0]
        await until(lambda: probe.status.checked_at is not None)  # the first probe, server idle
        async with aiohttp.ClientSession() as session:
            form = aiohttp.FormData()
            form.add_field("audio_file", b"x" * 100, filename="a.mp3")
            task = asyncio.create_task(
                session.post(f"{base}/asr", data=form, headers={"X-Sim-Audio-Seconds": "20"})
            )
            await until(lambda: sim.state()["active_tasks"] == 1)
            for _ in range(3):  # several probes while the server is busy
                clock.advance(probe.interval)
                await until(lambda: probe.status.checked_at == clock.wall())
            async with session.get(f"{base}/health") as response:
                status, doc = response.status, await response.json()
            (await task).release()
        assert status == 200
        expected = "busy" if health_path else "up"
        assert doc["upstream"]["state"] == expected
        assert app[STATE].snapshot().upstream_up is True
    finally:
        await sim.stop()


def test_json_log_lines_carry_the_same_facts(capsys: pytest.CaptureFixture[str]) -> None:
    """ASR_LOG_FORMAT=json writes one JSON object a line with the event's fields."""
    from gatekeeper.logs import Event, log_event

    configure_logging(fmt="json", level="INFO")
    try:
        log_event(Event.START, task_id="t-1", active="1/2", queued=3)
        log_event(Event.COOLDOWN, task_id="t-2", delay=15.0)
    finally:
        logging.getLogger().handlers.clear()
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "[ASR并发] 开始转录"
    assert (first["event"], first["task_id"], first["active"], first["queued"]) == (
        "start",
        "t-1",
        "1/2",
        3,
    )
    assert second["message"] == "[ASR并发] 检测到最近OOM，延迟15秒后开始"
    assert second["delay"] == 15.0


def test_text_log_lines_read_like_the_seed(capsys: pytest.CaptureFixture[str]) -> None:
    """Text lines keep the seed's wording, then key=value pairs."""
    from gatekeeper.logs import Event, log_event

    configure_logging(fmt="text", level="INFO")
    try:
        log_event(Event.START, task_id="abc", active="1/2", queued=3)
        log_event(Event.OOM, logging.WARNING, task_id="abc", oom_count=1)
        log_event(Event.QUEUE_FULL, logging.WARNING, task_id="xyz", queued="20/20")
        logging.getLogger("aiohttp.access").info("GET /metrics 200")  # scrape noise: hidden
    finally:
        logging.getLogger().handlers.clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        "[ASR并发] 开始转录 task_id=abc active=1/2 queued=3",
        "[ASR并发] 显存不足 task_id=abc oom_count=1",
        "[ASR并发] 队列已满，拒绝任务 task_id=xyz queued=20/20",
    ]


def test_malformed_request_is_one_warning_line(capsys: pytest.CaptureFixture[str]) -> None:
    """aiohttp's traceback for a malformed request becomes one warning line, not an ERROR."""
    from aiohttp.http_exceptions import BadHttpMessage

    configure_logging(fmt="text", level="INFO")
    try:
        try:
            raise BadHttpMessage("Too many headers received")
        except BadHttpMessage:
            logging.getLogger("aiohttp.server").exception("Error handling request")
    finally:
        logging.getLogger().handlers.clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert " WARNING [ASR并发] 拒绝格式错误的请求 error=" in lines[0]
    assert "Too many headers received" in lines[0]


async def test_refusal_lines_are_rate_limited_per_reason(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """In a flood, one refusal line a second per reason, counting the ones not logged."""
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="gatekeeper")
    base, app = await start_gatekeeper(upstream.url, clock=clock, max_queue=0)
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(
            session.post(f"{base}/asr", data=b"x", headers={"X-Fake-Hold": "h"})
        )
        await upstream.wait_active(1)
        for _ in range(5):
            async with session.post(f"{base}/asr", data=b"x") as response:
                assert response.status == 503
        clock.advance(1.0)
        async with session.post(f"{base}/asr", data=b"x") as response:
            assert response.status == 503
        upstream.release("h")
        (await held).release()
    lines = [r for r in caplog.records if "队列已满" in r.getMessage()]
    assert [r.gk_fields["not_logged_since_last"] for r in lines] == [0, 4]  # type: ignore[attr-defined]
    assert app[STATE].snapshot().rejected_tasks == 6
