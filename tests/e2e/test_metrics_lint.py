"""A real /metrics scrape passes Prometheus's own linter (`promtool check metrics`)."""

import asyncio
import subprocess

import aiohttp
import pytest

from gatekeeper.settings import server_name
from tests.conftest import GatekeeperFactory
from tests.fakes import FakeUpstream

pytestmark = pytest.mark.e2e


async def test_promtool_accepts_a_real_scrape(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, promtool: str
) -> None:
    """After real traffic, `promtool check metrics` finds no problem in the exposition."""
    base, _ = await start_gatekeeper(upstream.url, max_retries=1, retry_delay=0)
    async with aiohttp.ClientSession() as session:
        for script in ("ok", "oom,ok", "500"):
            async with session.post(
                f"{base}/asr", data=b"x", headers={"X-Fake-Script": script, "X-Request-ID": script}
            ) as response:
                await response.read()
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    assert f'asr_gatekeeper_oom_errors_total{{upstream="{server_name(upstream.url)}"}} 1.0' in text
    # Outside the event loop's thread: promtool must not block the gatekeeper it just scraped.
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = result.stdout + result.stderr
    assert result.returncode == 0, problems
    assert problems.strip() == ""
