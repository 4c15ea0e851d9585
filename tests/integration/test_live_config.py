"""Live reconfiguration: PATCH /admin/config and SIGHUP, with start-up's validation."""

import asyncio
import logging
import signal
from pathlib import Path

import aiohttp
import pytest

from gatekeeper.app import STATE
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream
from tests.processes import gatekeeper_process, read_until
from tests.waiting import until

ADMIN = {"Authorization": "Bearer admin-secret"}


async def _patch(base: str, body: object, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        async with session.patch(
            f"{base}/admin/config", json=body, headers=ADMIN if headers is None else headers
        ) as response:
            return response.status, await response.json()


async def test_admin_config_is_404_without_a_token(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """Without ASR_ADMIN_TOKEN /admin/config answers 404 itself and is never proxied."""
    base, _ = await start_gatekeeper(upstream.url)
    async with aiohttp.ClientSession() as session:
        for method in ("GET", "PATCH"):
            async with session.request(method, f"{base}/admin/config", json={}) as response:
                assert response.status == 404
                assert "ASR_ADMIN_TOKEN" in (await response.json())["detail"]
    assert upstream.seen == []


async def test_admin_config_needs_the_token_and_hides_it(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """GET /admin/config needs the Bearer token; the answer never shows a token."""
    base, _ = await start_gatekeeper(upstream.url, admin_token="admin-secret")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/admin/config") as response:
            assert response.status == 401
        async with session.get(f"{base}/admin/config", headers=ADMIN) as response:
            assert response.status == 200
            text = await response.text()
    assert "admin-secret" not in text
    assert '"admin_token_set": true' in text
    status, _ = await _patch(base, {"max_concurrent": 2}, headers={})
    assert status == 401


async def test_raising_the_limit_starts_queued_tasks_at_once(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """PATCH max_concurrent 1 → 3 lets two queued tasks start immediately; the change is logged."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    base, app = await start_gatekeeper(upstream.url, admin_token="admin-secret")
    async with aiohttp.ClientSession() as session:
        calls = [
            asyncio.create_task(
                session.post(f"{base}/asr", data=b"x", headers={"X-Fake-Hold": "h"})
            )
            for _ in range(3)
        ]
        await upstream.wait_active(1)
        await until(lambda: app[STATE].snapshot().queued_tasks == 2)
        status, doc = await _patch(base, {"max_concurrent": 3})
        assert status == 200
        assert doc["changed"]["max_concurrent"] == {"old": 1, "new": 3}
        assert doc["changed"]["max_queue"] == {"old": 10, "new": 30}  # the default follows
        await upstream.wait_active(3)
        upstream.release("h")
        for call in calls:
            (await call).release()
    lines = [r for r in caplog.records if "配置已更改" in r.getMessage()]
    fields = {r.gk_fields["setting"]: r.gk_fields for r in lines}  # type: ignore[attr-defined]
    assert fields["max_concurrent"]["old"] == 1
    assert fields["max_concurrent"]["new"] == 3
    assert fields["max_concurrent"]["by"] == "127.0.0.1"


async def test_lowering_the_limit_never_stops_running_tasks(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """PATCH 3 → 1 keeps three running tasks; a new one waits until active drops below 1."""
    base, app = await start_gatekeeper(upstream.url, admin_token="admin-secret", max_concurrent=3)
    async with aiohttp.ClientSession() as session:
        running = [
            asyncio.create_task(
                session.post(f"{base}/asr", data=b"x", headers={"X-Fake-Hold": f"h{i}"})
            )
            for i in range(3)
        ]
        await upstream.wait_active(3)
        assert (await _patch(base, {"max_concurrent": 1}))[0] == 200
        waiting = asyncio.create_task(session.post(f"{base}/asr", data=b"x"))
        await until(lambda: app[STATE].snapshot().queued_tasks == 1)
        upstream.release("h0")
        upstream.release("h1")
        await until(lambda: upstream.active == 1)
        # Both released slots are back; a freed slot goes to a waiter in the same step, so the
        # queue now shows the gate's decision.
        await until(lambda: app[STATE].snapshot().active_tasks == 1)
        assert app[STATE].snapshot().queued_tasks == 1  # still 1 running: not below the limit
        upstream.release("h2")
        assert (await waiting).status == 200
        statuses = [(await call).status for call in running]
    assert statuses == [200, 200, 200]
    assert upstream.max_active == 3


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"max_concurrent": 0}, "ASR_MAX_CONCURRENT=0 is invalid"),
        ({"retry_jitter": 2}, "ASR_RETRY_JITTER=2 is invalid"),
        ({"upstream_url": "http://elsewhere:9000"}, "upstream_url cannot change while running"),
        ({"no_such_setting": 1}, "no_such_setting is not a setting"),
        ({"adaptive": True, "min_concurrent": 5}, "ASR_MIN_CONCURRENT ≤ ASR_INITIAL_CONCURRENT"),
    ],
)
async def test_invalid_changes_are_refused_and_nothing_changes(
    upstream: FakeUpstream,
    start_gatekeeper: GatekeeperFactory,
    patch: dict[str, object],
    words: str,
) -> None:
    """A bad PATCH gets 400 naming the problem, and the running settings stay as they were."""
    base, app = await start_gatekeeper(upstream.url, admin_token="admin-secret", max_concurrent=2)
    status, doc = await _patch(base, patch)
    assert status == 400
    assert any(words in line for line in doc["problems"]), doc
    assert app[STATE].snapshot().gate.limit == 2
    status, doc = await _patch(base, "not an object")
    assert status == 400


async def test_null_returns_a_setting_to_its_derived_default(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """PATCH {"max_queue": null} after an explicit value: the queue is 10 × the limit again."""
    base, app = await start_gatekeeper(upstream.url, admin_token="admin-secret", max_concurrent=2)
    status, _ = await _patch(base, {"max_queue": 5})
    assert status == 200
    assert app[STATE].snapshot().gate.max_queue == 5
    status, _ = await _patch(base, {"max_queue": None, "max_concurrent": 3})
    assert status == 200
    assert app[STATE].snapshot().gate.max_queue == 30


async def test_sighup_rereads_the_env_file(upstream: FakeUpstream, tmp_path: Path) -> None:
    """SIGHUP applies a changed env file; a bad value is refused and the old settings stay."""
    env_file = tmp_path / "gatekeeper.env"
    env_file.write_text("ASR_MAX_CONCURRENT=1\n")
    args = ("--env-file", str(env_file))
    async with gatekeeper_process(upstream.url, *args) as (proc, base):
        async with aiohttp.ClientSession() as session:

            async def limit() -> int:
                async with session.get(f"{base}/stats") as response:
                    value: int = (await response.json())["max_concurrent"]
                    return value

            async def limit_is(n: int) -> bool:
                return await limit() == n

            assert await limit() == 1
            env_file.write_text("ASR_MAX_CONCURRENT=3\nASR_LOG_LEVEL=DEBUG\n")
            proc.send_signal(signal.SIGHUP)
            await until(lambda: limit_is(3), every=0.02)
            env_file.write_text("ASR_MAX_CONCURRENT=zero\n")
            proc.send_signal(signal.SIGHUP)
            assert proc.stderr is not None
            read = await read_until(proc.stderr, "配置重载失败")  # the reload is over
            assert await limit() == 3
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        log = read + (await proc.stderr.read()).decode()
    assert "[ASR并发] 配置已更改 setting=max_concurrent old=1 new=3 by=local via=sighup" in log
    assert "配置更改需要重启才能生效 settings=log_level" in log
    assert "配置重载失败，保留当前配置" in log
    assert "ASR_MAX_CONCURRENT=zero" in log
