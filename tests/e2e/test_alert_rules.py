"""The Prometheus alert rules and scrape config, checked and unit-tested with the real promtool.

promtool is a required tool here, like nginx for the other e2e tests: when it is missing the
tests fail and say how to install it, they never skip.
"""

import asyncio
import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from tests.conftest import GatekeeperFactory
from tests.e2e.tools import (
    CLUSTER_METRICS,
    EXPORTED_METRICS,
    HISTOGRAMS,
    METRIC_NAME,
    ROOT,
    contract_violations,
    run_promtool,
)
from tests.fakes import FakeUpstream
from tests.redis_server import RedisServer, admin_client, quiet_key, redis_binary, redis_now_ms

pytestmark = pytest.mark.e2e

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"

# The alerts the operator guide asks for ("监控告警", "第4步：调优") and the issues name
# (#15: one Whisper server of several down, and all of them down; #17: a replica lost a lease,
# a replica cannot reach Redis).
REQUIRED_ALERTS = {
    "AsrOomFrequent",
    "AsrQueueOftenFull",
    "AsrSuccessRateLow",
    "AsrUpstreamDown",
    "AsrUpstreamServerDown",
    "AsrQueueNearlyFull",
    "AsrLeaseLost",
    "AsrRedisUnreachable",
}
# Alerts about one Whisper server of a pool: they carry its label upstream="host:port".
PER_SERVER_ALERTS = {"AsrOomFrequent", "AsrUpstreamFailing", "AsrUpstreamServerDown"}
# Alerts about one replica of several sharing Redis: they name its instance, not the others.
PER_REPLICA_ALERTS = {"AsrLeaseLost", "AsrRedisUnreachable"}


def alert_names(text: str) -> list[str]:
    return re.findall(r"^\s*-\s*alert:\s*(\S+)\s*$", text, flags=re.MULTILINE)


def alert_blocks(text: str) -> dict[str, str]:
    """Each alert's rule text, from its `- alert:` line to the next rule."""
    parts = re.split(r"^(?=\s*-\s*(?:alert|record):)", text, flags=re.MULTILINE)
    blocks: dict[str, str] = {}
    for part in parts:
        head = re.match(r"\s*-\s*alert:\s*(\S+)", part)
        if head:
            blocks[head.group(1)] = part
    return blocks


def assert_success(result: subprocess.CompletedProcess[str]) -> None:
    command = " ".join(result.args)
    assert result.returncode == 0, (
        f"`{command}` exited with {result.returncode}:\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    """promtool accepts alerts.yml with every lint check fatal."""
    result = run_promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", ALERTS)
    assert_success(result)


def test_promtool_counts_every_rule_the_file_declares(promtool: str) -> None:
    """promtool loads exactly the rules these tests see, so the text checks below miss none."""
    result = run_promtool(promtool, "check", "rules", ALERTS)
    assert_success(result)
    text = ALERTS.read_text(encoding="utf-8")
    declared = len(re.findall(r"^\s*-\s*(?:alert|record):", text, flags=re.MULTILINE))
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout + result.stderr)
    assert found is not None, result.stdout + result.stderr
    assert int(found.group(1)) == declared


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    """Every scenario in alerts_test.yml fires or stays quiet as written."""
    assert_success(run_promtool(promtool, "test", "rules", ALERTS_TEST))


def test_prometheus_config_is_valid_and_loads_the_alert_rules(promtool: str) -> None:
    """promtool accepts prometheus.yml and finds alerts.yml next to it through rule_files.

    rule_files is relative, so the same file works here and mounted in /etc/prometheus/.
    """
    result = run_promtool(promtool, "check", "config", "--lint-fatal", CONFIG)
    assert_success(result)
    output = result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in output, output
    assert f"Checking {ALERTS}" in output, output


def test_prometheus_scrapes_the_gatekeeper_job(promtool: str) -> None:
    """Prometheus scrapes gatekeeper:8000/metrics every 15 s as job asr-gatekeeper."""
    # Static targets arrive at once; promtool otherwise waits its full 30 s timeout.
    result = run_promtool(
        promtool, "check", "service-discovery", "--timeout=2s", CONFIG, "asr-gatekeeper"
    )
    assert_success(result)
    targets = json.loads(result.stdout)
    assert [target["labels"] for target in targets] == [
        {
            "__address__": "gatekeeper:8000",
            "__metrics_path__": "/metrics",
            "__scheme__": "http",
            "__scrape_interval__": "15s",
            "__scrape_timeout__": "10s",
            # The alert rules' unit tests and annotations use these two labels.
            "instance": "gatekeeper:8000",
            "job": "asr-gatekeeper",
        }
    ]


def test_every_alert_the_guide_asks_for_exists() -> None:
    """alerts.yml defines the alerts the guide and the issues name, each exactly once."""
    names = alert_names(ALERTS.read_text(encoding="utf-8"))
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert set(names) >= REQUIRED_ALERTS, f"missing: {REQUIRED_ALERTS - set(names)}"


def test_alert_rules_reference_only_exported_metrics() -> None:
    """Every asr_gatekeeper_ metric and outcome/reason value in alerts.yml is in the contract."""
    text = ALERTS.read_text(encoding="utf-8")
    assert METRIC_NAME.search(text), "no gatekeeper metric found at all"
    assert contract_violations(text) == []


def test_every_alert_tells_the_operator_what_to_do() -> None:
    """Each alert has a severity and Chinese summary, description and action annotations."""
    blocks = alert_blocks(ALERTS.read_text(encoding="utf-8"))
    assert set(blocks) == set(alert_names(ALERTS.read_text(encoding="utf-8")))
    for name, block in blocks.items():
        assert re.search(r"severity:\s*(warning|critical)\s*$", block, re.M), name
        for key in ("summary", "description", "action"):
            found = re.search(rf"^\s*{key}:", block, re.M)
            assert found, f"{name} has no {key} annotation"
        assert re.search(r"[\u4e00-\u9fff]", block), f"{name} has no Chinese text"
        assert "{{ $value" in block or "{{ $labels" in block, f"{name} templates nothing"


def test_alert_annotations_keep_the_guides_words() -> None:
    """The OOM, queue and success-rate alerts say what the operator guide says."""
    blocks = alert_blocks(ALERTS.read_text(encoding="utf-8"))
    assert "ASR OOM频繁，建议降低并发" in blocks["AsrOomFrequent"]
    assert "nvidia-smi" in blocks["AsrOomFrequent"]
    assert "ASR队列频繁满载，建议提高并发" in blocks["AsrQueueOftenFull"]
    assert "没有OOM" in blocks["AsrQueueOftenFull"]
    assert "成功率<90%：必须降低并发" in blocks["AsrSuccessRateLow"]
    assert "curl http://whisper-service-url/health" in blocks["AsrUpstreamDown"]
    assert "docker logs" in blocks["AsrUpstreamDown"]


def test_replica_alerts_say_what_happened_and_what_to_check() -> None:
    """The Redis alerts name the consequence the issue describes and where an operator looks."""
    blocks = alert_blocks(ALERTS.read_text(encoding="utf-8"))
    lost = blocks["AsrLeaseLost"]
    for words in ("ASR_REDIS_LEASE", "SIGSTOP", "事件循环", "超过了并发上限", '"lease lost"'):
        assert words in lost, words
    unreachable = blocks["AsrRedisUnreachable"]
    assert re.search(r"severity:\s*critical", unreachable)
    assert re.search(r"for:\s*1m", unreachable)
    for words in ("coordination_unavailable", "degraded", "不再开始新任务", "自动恢复", "ping"):
        assert words in unreachable, words
    # Refusals for want of Redis are no reason to raise the concurrency.
    expr = re.search(r"expr:.*?labels:", blocks["AsrQueueOftenFull"], re.S)
    assert expr is not None
    assert "coordination_unavailable" not in expr.group(0)


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """alerts_test.yml makes every alert fire at least once and stay quiet at least once."""
    text = ALERTS_TEST.read_text(encoding="utf-8")
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", text)
    fires = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    names = set(alert_names(ALERTS.read_text(encoding="utf-8")))
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"
    assert "exp_annotations:" in text
    assert "exp_labels:" in text


def test_alerts_are_unit_tested_on_a_pool_of_two_servers() -> None:
    """Per-server alerts fire for one named server of two; the page fires once when all are down."""
    tests = YAML(typ="safe", pure=True).load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
    fired: dict[str, list[tuple[int, list[str | None]]]] = {}
    for case in tests:
        servers = {
            match.group(1)
            for series in case["input_series"]
            for match in [re.search(r'upstream="([^"]+)"', series["series"])]
            if match
        }
        for check in case.get("alert_rule_test", []):
            if check["exp_alerts"]:
                upstreams = [alert["exp_labels"].get("upstream") for alert in check["exp_alerts"]]
                fired.setdefault(check["alertname"], []).append((len(servers), upstreams))
    for name in PER_SERVER_ALERTS:
        assert any(
            servers >= 2 and len(upstreams) == 1 and upstreams[0]
            for servers, upstreams in fired.get(name, [])
        ), f"{name} is never shown firing for one server of a pool"
    assert any(
        servers >= 2 and upstreams == [None] for servers, upstreams in fired["AsrUpstreamDown"]
    ), "AsrUpstreamDown is never shown firing once for a pool whose servers are all down"


def test_replica_alerts_are_unit_tested_on_two_replicas() -> None:
    """Per-replica alerts fire for one named replica of two, not for the cluster as a whole."""
    tests = YAML(typ="safe", pure=True).load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
    fired: dict[str, list[tuple[int, list[str]]]] = {}
    for case in tests:
        replicas = {
            match.group(1)
            for series in case["input_series"]
            if "_cluster_" in series["series"]
            for match in [re.search(r'instance="([^"]+)"', series["series"])]
            if match
        }
        for check in case.get("alert_rule_test", []):
            if check["exp_alerts"]:
                named = [alert["exp_labels"]["instance"] for alert in check["exp_alerts"]]
                fired.setdefault(check["alertname"], []).append((len(replicas), named))
    for name in PER_REPLICA_ALERTS:
        assert any(replicas >= 2 and len(named) == 1 for replicas, named in fired.get(name, [])), (
            f"{name} is never shown firing for one replica of two"
        )


async def test_the_metric_contract_is_what_a_pool_gatekeeper_exports(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory
) -> None:
    """A gatekeeper in front of two servers exports each contract metric with exactly its labels.

    The alert rules and the dashboard are checked against that contract (tests/e2e/tools.py), so
    this keeps the contract honest: per-server series name both servers, totals carry no upstream.
    Without ASR_REDIS_URL it exports none of the replicas' metrics, so their alerts stay silent.
    """
    second = FakeUpstream()
    await second.start()
    try:
        base, _ = await start_gatekeeper(f"{upstream.url},{second.url}", max_concurrent="2,1")
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
            text = await response.text()
    finally:
        await second.stop()
    exported = _Exported(text)
    names = {f"127.0.0.1:{upstream.port}", f"127.0.0.1:{second.port}"}
    exported.assert_contract(EXPORTED_METRICS, names)
    assert set(EXPORTED_METRICS) | set(CLUSTER_METRICS) >= HISTOGRAMS
    assert not [name for name in exported.labels if name.startswith("asr_gatekeeper_cluster_")]


async def test_the_replica_metric_contract_is_what_a_replica_with_redis_exports(
    upstream: FakeUpstream, start_gatekeeper: GatekeeperFactory, tmp_path: Path
) -> None:
    """A replica (ASR_REDIS_URL, a real redis-server) exports each replica metric of the contract.

    Exactly its labels, leases held per server as Redis counts them while tasks run on both
    servers, and no replica metric the contract (so the alerts and the dashboard) does not know.
    """
    cluster = "alert-rules-contract"
    redis = RedisServer(redis_binary(), tmp_path)
    redis.start()
    second = FakeUpstream()
    await second.start()
    try:
        # A Redis the cluster has used before: no quiet time after an empty start to wait out.
        admin = admin_client(redis.url)
        try:
            await admin.set(quiet_key(cluster), await redis_now_ms(admin))
        finally:
            await admin.aclose()
        base, _ = await start_gatekeeper(
            f"{upstream.url},{second.url}",
            max_concurrent="2,1",
            redis_url=redis.url,
            cluster=cluster,
        )
        async with aiohttp.ClientSession() as session:
            # Three tasks fill both servers (2 + 1 slots), each holding its lease until released.
            tasks = [
                asyncio.create_task(_post_held(session, f"{base}/asr", str(n))) for n in range(3)
            ]
            try:
                await upstream.wait_active(2)
                await second.wait_active(1)
                async with session.get(f"{base}/metrics") as response:
                    text = await response.text()
            finally:
                upstream.release()
                second.release()
            assert await asyncio.gather(*tasks) == [200, 200, 200]
    finally:
        await second.stop()
        redis.stop()
    exported = _Exported(text)
    first_name, second_name = f"127.0.0.1:{upstream.port}", f"127.0.0.1:{second.port}"
    exported.assert_contract(CLUSTER_METRICS, {first_name, second_name})
    replica_metrics = {n for n in exported.labels if n.startswith("asr_gatekeeper_cluster_")}
    assert replica_metrics == set(CLUSTER_METRICS), "replica metrics the contract does not know"
    held = exported.values["asr_gatekeeper_cluster_leases_held"]
    assert held == {(("upstream", first_name),): 2.0, (("upstream", second_name),): 1.0}
    assert exported.values["asr_gatekeeper_cluster_redis_up"] == {(): 1.0}
    assert exported.values["asr_gatekeeper_cluster_acquire_seconds_count"][()] >= 3


async def _post_held(session: aiohttp.ClientSession, url: str, request_id: str) -> int:
    headers = {"X-Fake-Hold": "hold", "X-Request-ID": request_id}
    async with session.post(url, data=b"x", headers=headers) as response:
        await response.read()
        return response.status


class _Exported:
    """One /metrics scrape, read as the contract sees it (a histogram by its base name)."""

    def __init__(self, text: str) -> None:
        self.labels: dict[str, set[frozenset[str]]] = defaultdict(set)
        self.servers: dict[str, set[str]] = defaultdict(set)
        self.values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
                name = sample.name
                if family.type == "histogram":
                    name = re.sub(r"_(bucket|sum|count)$", "", name)
                self.labels[name].add(frozenset(sample.labels) - {"le"})
                if "upstream" in sample.labels:
                    self.servers[name].add(sample.labels["upstream"])

    def assert_contract(
        self, contract: dict[str, dict[str, set[str] | None]], servers: set[str]
    ) -> None:
        for metric, labels in contract.items():
            assert metric in self.labels, f"{metric} is not exported"
            assert self.labels[metric] == {frozenset(labels)}, f"{metric}: {self.labels[metric]}"
            if "upstream" in labels:
                assert self.servers[metric] == servers, f"{metric} does not show each server"


def test_contract_check_catches_misspelled_metrics_and_labels() -> None:
    """The metric check is not vacuous: typos in names or label values are reported."""
    assert contract_violations("increase(asr_gatekeeper_oom_error_total[1h]) > 5") == [
        "unknown metric asr_gatekeeper_oom_error_total"
    ]
    assert contract_violations('asr_gatekeeper_tasks_total{outcome=~"success|faild"}') != []
    assert contract_violations('asr_gatekeeper_rejected_total{outcome="queue_full"}') != []
    assert contract_violations("asr_gatekeeper_queue_wait_seconds_bucket{le='1'}") == []
    assert contract_violations("asr_gatekeeper_max_concurrent_bucket") != []
    # Per-server series carry upstream (any host:port); totals do not.
    assert contract_violations('asr_gatekeeper_oom_errors_total{upstream="gpu0:9000"}') == []
    assert contract_violations('asr_gatekeeper_upstream_up{upstream=~"gpu.*"}') == []
    assert contract_violations('asr_gatekeeper_tasks_total{upstream="gpu0:9000"}') == [
        "asr_gatekeeper_tasks_total has no label upstream"
    ]
    assert contract_violations("asr_gatekeeper_upstream_max_concurrency") != []
    # The replicas' metrics (#17) and their refusal reason are in the contract; typos are not.
    assert (
        contract_violations('asr_gatekeeper_rejected_total{reason="coordination_unavailable"}')
        == []
    )
    assert contract_violations('asr_gatekeeper_cluster_leases_held{upstream="gpu0:9000"}') == []
    assert contract_violations("asr_gatekeeper_cluster_acquire_seconds_bucket") == []
    assert contract_violations("asr_gatekeeper_cluster_redis_down") != []
    assert contract_violations('asr_gatekeeper_cluster_leases_lost_total{reason="paused"}') != []
    assert contract_violations('asr_gatekeeper_cluster_redis_up{upstream="gpu0:9000"}') == [
        "asr_gatekeeper_cluster_redis_up has no label upstream"
    ]


def test_promtool_check_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """promtool really parses the expressions: a broken one makes the check fail."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n  - name: broken\n    rules:\n      - alert: Broken\n"
        "        expr: increase(asr_gatekeeper_oom_errors_total[1h] > 5\n",
        encoding="utf-8",
    )
    result = run_promtool(promtool, "check", "rules", broken)
    assert result.returncode != 0, result.stdout + result.stderr
