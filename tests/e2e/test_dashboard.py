"""The provisioned Grafana dashboard: its shape, and every query checked with the real promtool.

Grafana is not needed: the queries are PromQL, and promtool both parses them (as recording
rules) and runs them against synthetic gatekeeper series (as unit-tested alert rules): a
gatekeeper in front of two Whisper servers, whose per-server series carry upstream="host:port",
and two such gatekeepers sharing the servers' slots through Redis (replicas, label instance).
"""

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.tools import CLUSTER_METRICS, METRIC_NAME, ROOT, contract_violations, run_promtool

pytestmark = pytest.mark.e2e

GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "asr-gatekeeper.json"
DATASOURCE_PROVISIONING = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVISIONING = GRAFANA_DIR / "provisioning" / "dashboards" / "gatekeeper.yml"
DATASOURCE_UID = "prometheus"

# The metrics contract (SPEC.md, "Metrics"): name -> {label: allowed values}.
_TASK_OUTCOMES = {"success", "failed", "client_error", "cancelled", "rejected"}
_REJECT_REASONS = {"queue_full", "queue_timeout", "shutting_down", "coordination_unavailable"}
_ATTEMPT_OUTCOMES = {"ok", "client_error", "oom", "crash", "error", "timeout"}
_RETRY_OUTCOMES = {"oom", "crash", "error", "timeout"}
_LOST_REASONS = {"expired", "unconfirmed"}
# The Whisper servers behind the synthetic gatekeeper (ASR_UPSTREAM_URL with two URLs).
UPSTREAMS = ("gpu0:9000", "gpu1:9000")
# Totals over every server: no upstream label.
GAUGES = {
    "asr_gatekeeper_max_concurrent": 4,
    "asr_gatekeeper_active_tasks": 2,
    "asr_gatekeeper_queued_tasks": 3,
    "asr_gatekeeper_max_queue": 40,
    "asr_gatekeeper_shutting_down": 0,
    "asr_gatekeeper_retrying_tasks": 1,
}
COUNTERS: dict[str, tuple[str, set[str]] | None] = {
    "asr_gatekeeper_tasks_total": ("outcome", _TASK_OUTCOMES),
    "asr_gatekeeper_rejected_total": ("reason", _REJECT_REASONS),
    "asr_gatekeeper_retries_total": ("outcome", _RETRY_OUTCOMES),
}
# Per server: one series for each of UPSTREAMS, label upstream.
SERVER_GAUGES = {
    "asr_gatekeeper_upstream_up": 1,
    "asr_gatekeeper_upstream_max_concurrent": 2,
    "asr_gatekeeper_upstream_active_tasks": 1,
    "asr_gatekeeper_last_oom_timestamp_seconds": 1_738_117_800,
}
SERVER_COUNTERS: dict[str, tuple[str, set[str]] | None] = {
    "asr_gatekeeper_upstream_attempts_total": ("outcome", _ATTEMPT_OUTCOMES),
    "asr_gatekeeper_oom_errors_total": None,
}
# Replicas (#17), only with ASR_REDIS_URL: each replica (instance) its own.
CLUSTER_GAUGES = {"asr_gatekeeper_cluster_redis_up": 1}
CLUSTER_COUNTERS: dict[str, tuple[str, set[str]] | None] = {
    "asr_gatekeeper_cluster_lease_renewals_total": None,
    "asr_gatekeeper_cluster_redis_errors_total": None,
    "asr_gatekeeper_cluster_leases_lost_total": ("reason", _LOST_REASONS),
}
CLUSTER_SERVER_GAUGES = {"asr_gatekeeper_cluster_leases_held": 1}
HISTOGRAMS = {
    "asr_gatekeeper_queue_wait_seconds",
    "asr_gatekeeper_upstream_duration_seconds",
    "asr_gatekeeper_task_duration_seconds",
    "asr_gatekeeper_cluster_acquire_seconds",
}
EXPORTED_METRICS = (
    set(GAUGES)
    | set(COUNTERS)
    | set(SERVER_GAUGES)
    | set(SERVER_COUNTERS)
    | set(CLUSTER_GAUGES)
    | set(CLUSTER_COUNTERS)
    | set(CLUSTER_SERVER_GAUGES)
    | HISTOGRAMS
)
# The per-server row: title -> the per-server metrics it must show.
PER_SERVER_PANELS = {
    "每台服务器：活跃 vs 上限": {
        "asr_gatekeeper_upstream_active_tasks",
        "asr_gatekeeper_upstream_max_concurrent",
    },
    "每台服务器：可达": {"asr_gatekeeper_upstream_up"},
    "每台服务器：OOM": {"asr_gatekeeper_oom_errors_total"},
    "每台服务器：尝试（按结果）": {"asr_gatekeeper_upstream_attempts_total"},
}
# The replicas row: title -> the metrics it must show, one line per replica (instance).
REPLICA_ROW = "副本（Redis） Replicas (Redis)"
REPLICA_PANELS = {
    "副本：Redis 可达": {"asr_gatekeeper_cluster_redis_up"},
    "副本：持有的租约（每台服务器）": {
        "asr_gatekeeper_cluster_leases_held",
        "asr_gatekeeper_upstream_max_concurrent",
    },
    "副本：租约续期（每分钟）": {"asr_gatekeeper_cluster_lease_renewals_total"},
    "副本：丢失的租约 (1h)": {"asr_gatekeeper_cluster_leases_lost_total"},
    "副本：Redis 错误（每分钟）": {"asr_gatekeeper_cluster_redis_errors_total"},
    "副本：拒绝 coordination_unavailable（每分钟）": {"asr_gatekeeper_rejected_total"},
    "副本：获取租约耗时 p50 / p99": {"asr_gatekeeper_cluster_acquire_seconds_bucket"},
}
REPLICAS = ("gatekeeper-a:8000", "gatekeeper-b:8000")
# Panels that add the servers up, as /stats's top-level fields do.
TOTAL_PANELS = {
    "活跃任务 vs 并发上限（合计）",
    "OOM（合计）",
    "上游尝试（按结果，合计）",
    "OOM (1h)",
}

# Grafana's built-in interval variables, replaced by a plausible value before checking.
_BUILTIN_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

_SERIES_LABELS = 'job="asr-gatekeeper", instance="gatekeeper:8000"'


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def all_exprs(node: Any) -> Iterator[str]:
    """Every PromQL `expr` anywhere in the dashboard: panel targets and annotations."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from all_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_exprs(item)


def substitute_variables(expr: str, dashboard_variables: set[str]) -> str:
    """Replace Grafana variables so promtool sees plain PromQL; unknown ones stay and fail."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in _BUILTIN_INTERVALS:
            return _BUILTIN_INTERVALS[name]
        if name in dashboard_variables:
            return ".*"  # dashboard variables sit in regex label matchers (instance=~"$instance")
        return match.group(0)

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query in the dashboard, variables substituted."""
    dashboard = load_dashboard()
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    queries = [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in query_panels(dashboard)
        for target in panel["targets"]
    ]
    queries += [
        (f"annotation {annotation['name']!r}", annotation["expr"])
        for annotation in dashboard["annotations"]["list"]
        if "expr" in annotation
    ]
    assert len(queries) == len(list(all_exprs(dashboard))), "an expr sits somewhere unexpected"
    return [(where, substitute_variables(expr, variables)) for where, expr in queries]


def promql_errors(promtool: str, exprs: list[str], directory: Path) -> str | None:
    """promtool's complaint about any of `exprs`, or None when all of them parse.

    promtool has no "parse this expression" command, so each expression becomes a recording
    rule and the file goes through `promtool check rules`. JSON is valid YAML.
    """
    rules = [{"record": f"dashboard:check:{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = directory / "dashboard_exprs.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), "utf-8")
    result = run_promtool(promtool, "check", "rules", path)
    if result.returncode == 0:
        return None
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def _counter_series(
    counters: dict[str, tuple[str, set[str]] | None], labels: str
) -> list[dict[str, str]]:
    series = []
    for name, labelled in counters.items():
        if labelled is None:
            series.append({"series": f"{name}{{{labels}}}", "values": "0+1x120"})
            continue
        label, values = labelled
        series += [
            {"series": f'{name}{{{labels}, {label}="{value}"}}', "values": "0+1x120"}
            for value in sorted(values)
        ]
    return series


def traffic_series(
    instances: tuple[str, ...] = ("gatekeeper:8000",),
) -> list[dict[str, str]]:
    """Two hours of busy gatekeepers (replicas with Redis) on two servers: every exported
    series, counters growing."""
    series: list[dict[str, str]] = []
    for instance in instances:
        series += _instance_series(f'job="asr-gatekeeper", instance="{instance}"')
    return series


def _instance_series(instance: str) -> list[dict[str, str]]:
    """One gatekeeper's series; `instance` is its job and instance labels."""
    series = [
        {"series": f"{name}{{{instance}}}", "values": f"{value}x120"}
        for name, value in (GAUGES | CLUSTER_GAUGES).items()
    ]
    series += _counter_series(COUNTERS | CLUSTER_COUNTERS, instance)
    for upstream in UPSTREAMS:
        labels = f'{instance}, upstream="{upstream}"'
        series += [
            {"series": f"{name}{{{labels}}}", "values": f"{value}x120"}
            for name, value in (SERVER_GAUGES | CLUSTER_SERVER_GAUGES).items()
        ]
        series += _counter_series(SERVER_COUNTERS, labels)
    for name in sorted(HISTOGRAMS):
        for step, le in enumerate(("0.5", "5", "60", "600", "+Inf"), start=1):
            series.append(
                {"series": f'{name}_bucket{{{instance}, le="{le}"}}', "values": f"0+{step}x120"}
            )
        series.append({"series": f"{name}_sum{{{instance}}}", "values": "0+300x120"})
        series.append({"series": f"{name}_count{{{instance}}}", "values": "0+5x120"})
    return series


def run_promtool_unit_test(
    promtool: str, directory: Path, rules: list[dict[str, Any]], tests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    (directory / "rules.yml").write_text(
        json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), "utf-8"
    )
    test_file = directory / "rules_test.yml"
    test_file.write_text(
        json.dumps({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}),
        "utf-8",
    )
    return run_promtool(promtool, "test", "rules", test_file)


def panel_exprs(title: str) -> list[str]:
    """The queries of the panel called `title`, in target order, variables substituted."""
    dashboard = load_dashboard()
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    (panel,) = (panel for panel in query_panels(dashboard) if panel["title"] == title)
    return [substitute_variables(target["expr"], variables) for target in panel["targets"]]


def panel_expr(title: str) -> str:
    (expr,) = panel_exprs(title)
    return expr


def test_dashboard_is_the_provisioned_asr_gatekeeper_dashboard() -> None:
    """The JSON is a current Grafana dashboard with a fixed uid and title."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "asr-gatekeeper"
    assert dashboard["title"] == "ASR Gatekeeper"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["id"] is None  # provisioned dashboards get their id from Grafana
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"


def test_panels_do_not_overlap() -> None:
    """Every panel fits the 24-column grid and no two panels cover the same cell."""
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(load_dashboard()):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_every_panel_queries_the_provisioned_prometheus() -> None:
    """Every panel has PromQL targets on the datasource with uid "prometheus"."""
    dashboard = load_dashboard()
    panels = query_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
            assert target["expr"].strip(), f"{panel['title']!r} has an empty query"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] == DATASOURCE_UID, annotation["name"]


def test_grafana_provisioning_matches_the_dashboard() -> None:
    """Grafana provisions the datasource uid the dashboard uses and loads the dashboard dir."""
    datasource = DATASOURCE_PROVISIONING.read_text(encoding="utf-8")
    assert re.search(rf"^\s*uid:\s*{DATASOURCE_UID}\s*$", datasource, re.M), datasource
    assert re.search(r"^\s*type:\s*prometheus\s*$", datasource, re.M), datasource
    assert re.search(r"^\s*url:\s*http://prometheus:9090\s*$", datasource, re.M), datasource
    provider = DASHBOARD_PROVISIONING.read_text(encoding="utf-8")
    assert re.search(r"^\s*path:\s*/var/lib/grafana/dashboards\s*$", provider, re.M), provider
    assert re.search(r"^\s*type:\s*file\s*$", provider, re.M), provider


def test_dashboard_shows_every_exported_metric() -> None:
    """Every metric the gatekeeper exports is on some panel."""
    shown = {
        match.group(1) for _, expr in dashboard_queries() for match in METRIC_NAME.finditer(expr)
    }
    shown_bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in shown}
    assert EXPORTED_METRICS - (shown | shown_bases) == set()
    # The replicas' metrics as the contract (checked against a live replica) names them.
    assert set(CLUSTER_METRICS) <= EXPORTED_METRICS


def test_dashboard_shows_the_latency_percentiles() -> None:
    """Queue wait and upstream duration p50/p95 and task duration p95 come from _bucket rates."""
    exprs = [re.sub(r"\s+", " ", expr) for _, expr in dashboard_queries()]
    wanted = [
        ("0.5", "asr_gatekeeper_queue_wait_seconds"),
        ("0.95", "asr_gatekeeper_queue_wait_seconds"),
        ("0.5", "asr_gatekeeper_upstream_duration_seconds"),
        ("0.95", "asr_gatekeeper_upstream_duration_seconds"),
        ("0.95", "asr_gatekeeper_task_duration_seconds"),
    ]
    for quantile, metric in wanted:
        pattern = (
            rf"histogram_quantile\({re.escape(quantile)}, sum by \(le\) "
            rf"\(rate\({metric}_bucket\{{[^}}]*\}}\[5m\]\)\)\)"
        )
        assert any(re.search(pattern, expr) for expr in exprs), f"no p{quantile} of {metric}"


def test_dashboard_queries_reference_only_exported_metrics() -> None:
    """Every metric name and outcome/reason value in the dashboard is in the contract."""
    for where, expr in dashboard_queries():
        assert contract_violations(expr) == [], where
    # Descriptions and the variable query name metrics too.
    assert contract_violations(DASHBOARD.read_text(encoding="utf-8")) == []


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses every query once Grafana's variables are substituted."""
    queries = dashboard_queries()
    for where, expr in queries:
        assert "$" not in expr, f"{where}: unsubstituted variable in {expr}"
    assert promql_errors(promtool, [expr for _, expr in queries], tmp_path) is None


def test_every_dashboard_query_returns_data(promtool: str, tmp_path: Path) -> None:
    """Against a busy gatekeeper's series, every panel and annotation query has a result."""
    queries = dashboard_queries()
    rules = [
        {"alert": f"DashboardQuery{i}", "expr": f"count({expr}) > 0"}
        for i, (_, expr) in enumerate(queries)
    ]
    checks = [
        {"eval_time": "90m", "alertname": f"DashboardQuery{i}", "exp_alerts": [{"exp_labels": {}}]}
        for i in range(len(queries))
    ]
    tests = [{"interval": "1m", "input_series": traffic_series(), "alert_rule_test": checks}]
    result = run_promtool_unit_test(promtool, tmp_path, rules, tests)
    legend = "\n".join(f"DashboardQuery{i}: {where}" for i, (where, _) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{legend}"


def test_overview_stats_compute_what_the_stats_json_shows(promtool: str, tmp_path: Path) -> None:
    """Success rate is success ÷ (success + failed), blank without tasks; last OOM is in ms."""
    success_rate = panel_expr("成功率 (1h)")
    last_oom = panel_expr("最近一次 OOM")

    def tasks(success: str, failed: str, extra: str = "0x120") -> list[dict[str, str]]:
        name = "asr_gatekeeper_tasks_total"
        return [
            {"series": f'{name}{{{_SERIES_LABELS}, outcome="success"}}', "values": success},
            {"series": f'{name}{{{_SERIES_LABELS}, outcome="failed"}}', "values": failed},
            {"series": f'{name}{{{_SERIES_LABELS}, outcome="client_error"}}', "values": extra},
        ]

    def expect(expr: str, *values: float) -> dict[str, Any]:
        samples = [{"labels": "{}", "value": value} for value in values]
        return {"expr": expr, "eval_time": "90m", "exp_samples": samples}

    oom_at = f'asr_gatekeeper_last_oom_timestamp_seconds{{{_SERIES_LABELS}, upstream="gpu0:9000"}}'
    oom_at_gpu1 = oom_at.replace("gpu0", "gpu1")
    tests = [
        # 89 successes, 11 failures and 50 client errors a minute: 89 %.
        {
            "interval": "1m",
            "input_series": tasks("0+89x120", "0+11x120", "0+50x120"),
            "promql_expr_test": [expect(success_rate, 0.89)],
        },
        # Nothing finished: "no data" (the panel says 无任务), not 0 % or NaN.
        {
            "interval": "1m",
            "input_series": [*tasks("0x120", "0x120"), {"series": oom_at, "values": "0x120"}],
            "promql_expr_test": [expect(success_rate), expect(last_oom)],
        },
        # Only successes and no failed series at all: 100 %, not "no data".
        {
            "interval": "1m",
            "input_series": tasks("0+1x120", "_x120"),
            "promql_expr_test": [expect(success_rate, 1.0)],
        },
        # Only failures and no success series at all: 0 %, not "no data".
        {
            "interval": "1m",
            "input_series": tasks("_x120", "0+1x120"),
            "promql_expr_test": [expect(success_rate, 0.0)],
        },
        {
            "interval": "1m",
            "input_series": [{"series": oom_at, "values": "1738117800x120"}],
            "promql_expr_test": [expect(last_oom, 1_738_117_800_000)],
        },
        # Two servers: the latest OOM of either; one that never OOMed (0) does not hide it.
        {
            "interval": "1m",
            "input_series": [
                {"series": oom_at, "values": "1738117800x120"},
                {"series": oom_at_gpu1, "values": "1738121400x120"},
            ],
            "promql_expr_test": [expect(last_oom, 1_738_121_400_000)],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": oom_at, "values": "0x120"},
                {"series": oom_at_gpu1, "values": "1738121400x120"},
            ],
            "promql_expr_test": [expect(last_oom, 1_738_121_400_000)],
        },
    ]
    result = run_promtool_unit_test(promtool, tmp_path, [], tests)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_per_server_panels_show_each_server(promtool: str, tmp_path: Path) -> None:
    """Limit vs active, up, OOMs and attempts by outcome are shown for each server apart."""
    dashboard = load_dashboard()
    raw = {panel["title"]: panel["targets"] for panel in query_panels(dashboard)}
    assert set(PER_SERVER_PANELS) <= set(raw), "a per-server panel is missing"
    rules: list[dict[str, str]] = []
    for title, metrics in PER_SERVER_PANELS.items():
        for target in raw[title]:
            assert 'upstream=~"$upstream"' in target["expr"], f"{title}: not filtered by server"
        exprs = panel_exprs(title)
        shown = {match.group(1) for expr in exprs for match in METRIC_NAME.finditer(expr)}
        assert metrics <= shown, f"{title} does not show {metrics - shown}"
        for expr in exprs:
            # Each server's series stays apart (the upstream label survives the query).
            rules.append({"alert": f"PerServer{len(rules)}", "expr": _groups(expr, "upstream", 2)})
    (attempts,) = panel_exprs("每台服务器：尝试（按结果）")
    groups = len(UPSTREAMS) * len(_ATTEMPT_OUTCOMES)
    rules.append(
        {"alert": "AttemptsByOutcome", "expr": _groups(attempts, "upstream, outcome", groups)}
    )
    for title in sorted(TOTAL_PANELS):
        for expr in panel_exprs(title):
            # Totals add the servers up: one group, no upstream label left.
            rules.append({"alert": f"Total{len(rules)}", "expr": _groups(expr, "upstream", 1)})
    checks = [
        {"eval_time": "90m", "alertname": rule["alert"], "exp_alerts": [{"exp_labels": {}}]}
        for rule in rules
    ]
    tests = [{"interval": "1m", "input_series": traffic_series(), "alert_rule_test": checks}]
    result = run_promtool_unit_test(promtool, tmp_path, rules, tests)
    legend = "\n".join(f"{rule['alert']}: {rule['expr']}" for rule in rules)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{legend}"


def _groups(expr: str, labels: str, count: int) -> str:
    """PromQL that is non-empty when `expr` has exactly `count` distinct `labels` values."""
    return f"count(count by ({labels}) ({expr})) == {count}"


def test_the_overview_counts_servers_down_and_adds_the_servers_up(
    promtool: str, tmp_path: Path
) -> None:
    """The overview shows how many servers are down of how many; OOM (1h) sums the servers."""
    down, total = panel_exprs("Whisper 服务 DOWN / 总数")
    ooms = panel_expr("OOM (1h)")
    up = "asr_gatekeeper_upstream_up"
    oom = "asr_gatekeeper_oom_errors_total"

    def series(name: str, upstream: str, values: str) -> dict[str, str]:
        return {"series": f'{name}{{{_SERIES_LABELS}, upstream="{upstream}"}}', "values": values}

    def expect(expr: str, value: float) -> dict[str, Any]:
        return {"expr": expr, "eval_time": "90m", "exp_samples": [{"labels": "{}", "value": value}]}

    tests = [
        {
            "interval": "1m",
            "input_series": [series(up, "gpu0:9000", "1x120"), series(up, "gpu1:9000", "0x120")],
            "promql_expr_test": [expect(down, 1), expect(total, 2)],
        },
        {
            "interval": "1m",
            "input_series": [series(up, "gpu0:9000", "1x120"), series(up, "gpu1:9000", "1x120")],
            "promql_expr_test": [expect(down, 0), expect(total, 2)],
        },
        # A single server, down: as before, only counted.
        {
            "interval": "1m",
            "input_series": [series(up, "whisper:9000", "0x120")],
            "promql_expr_test": [expect(down, 1), expect(total, 1)],
        },
        # 3 OOMs on gpu0 and 2 on gpu1 within the hour: 5.
        {
            "interval": "1m",
            "input_series": [
                series(oom, "gpu0:9000", "0x40 1+1x2 3x80"),
                series(oom, "gpu1:9000", "0x50 1+1x1 2x70"),
            ],
            "promql_expr_test": [expect(ooms, 5)],
        },
    ]
    result = run_promtool_unit_test(promtool, tmp_path, [], tests)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_the_upstream_variable_lists_the_servers() -> None:
    """A dashboard variable picks servers by their upstream label, all of them by default."""
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    upstream = variables["upstream"]
    assert upstream["query"]["query"].startswith("label_values(asr_gatekeeper_upstream_up")
    assert upstream["query"]["query"].endswith(", upstream)")
    assert upstream["includeAll"] is True
    assert upstream["multi"] is True
    assert upstream["allValue"] == ".*"


def test_the_replicas_row_shows_each_replica(promtool: str, tmp_path: Path) -> None:
    """Under the replicas row, every panel keeps the replicas (instances) apart."""
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    (row,) = (panel for panel in panels if panel["type"] == "row" and panel["title"] == REPLICA_ROW)
    below = panels[panels.index(row) + 1 :]
    rows_below = [panel for panel in below if panel["type"] == "row"]
    end = below.index(rows_below[0]) if rows_below else len(below)
    assert {panel["title"] for panel in below[:end]} == set(REPLICA_PANELS)
    rules: list[dict[str, str]] = []
    for title, metrics in REPLICA_PANELS.items():
        exprs = panel_exprs(title)
        shown = {match.group(1) for expr in exprs for match in METRIC_NAME.finditer(expr)}
        assert metrics <= shown, f"{title} does not show {metrics - shown}"
        for expr in exprs:
            if "by (upstream)" in expr:
                continue  # the held panel's total and limit: per server, all replicas together
            rules.append({"alert": f"Replica{len(rules)}", "expr": _groups(expr, "instance", 2)})
    held, total, limit = panel_exprs("副本：持有的租约（每台服务器）")
    lost = panel_expr("副本：丢失的租约 (1h)")
    rules += [
        {"alert": "HeldByReplicaAndServer", "expr": _groups(held, "instance, upstream", 4)},
        {"alert": "HeldTotal", "expr": _groups(total, "upstream", 2)},
        {"alert": "HeldLimit", "expr": _groups(limit, "upstream", 2)},
        {"alert": "LostByReason", "expr": _groups(lost, "instance, reason", 4)},
    ]
    checks = [
        {"eval_time": "90m", "alertname": rule["alert"], "exp_alerts": [{"exp_labels": {}}]}
        for rule in rules
    ]
    tests = [
        {"interval": "1m", "input_series": traffic_series(REPLICAS), "alert_rule_test": checks}
    ]
    result = run_promtool_unit_test(promtool, tmp_path, rules, tests)
    legend = "\n".join(f"{rule['alert']}: {rule['expr']}" for rule in rules)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{legend}"


def test_the_replicas_row_adds_the_leases_up_against_the_limit(
    promtool: str, tmp_path: Path
) -> None:
    """Leases held add up over the replicas per server beside that server's limit; refusals
    count coordination_unavailable alone; acquisition latency is p50 and p99 per replica."""
    _, total, limit = panel_exprs("副本：持有的租约（每台服务器）")
    refused = panel_expr("副本：拒绝 coordination_unavailable（每分钟）")
    p50, p99 = panel_exprs("副本：获取租约耗时 p50 / p99")
    held = "asr_gatekeeper_cluster_leases_held"
    rejected = "asr_gatekeeper_rejected_total"
    acquire = "asr_gatekeeper_cluster_acquire_seconds_bucket"

    def series(name: str, instance: str, values: str, **labels: str) -> dict[str, str]:
        extra = "".join(f', {key}="{value}"' for key, value in labels.items())
        selector = f'job="asr-gatekeeper", instance="{instance}:8000"{extra}'
        return {"series": f"{name}{{{selector}}}", "values": values}

    def expect(expr: str, *samples: tuple[str, float]) -> dict[str, Any]:
        wanted = [{"labels": labels, "value": value} for labels, value in samples]
        return {"expr": expr, "eval_time": "90m", "exp_samples": wanted}

    limits = [
        series("asr_gatekeeper_upstream_max_concurrent", replica, "3x120", upstream="gpu0:9000")
        for replica in ("gatekeeper-a", "gatekeeper-b")
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": [
                series(held, "gatekeeper-a", "2x120", upstream="gpu0:9000"),
                series(held, "gatekeeper-b", "1x120", upstream="gpu0:9000"),
                *limits,
            ],
            "promql_expr_test": [
                expect(total, ('{upstream="gpu0:9000"}', 3)),
                expect(limit, ('{upstream="gpu0:9000"}', 3)),
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series(rejected, "gatekeeper-a", "0+2x120", reason="coordination_unavailable"),
                series(rejected, "gatekeeper-a", "0+50x120", reason="queue_full"),
            ],
            "promql_expr_test": [expect(refused, ('{instance="gatekeeper-a:8000"}', 2))],
        },
        # Half the acquisitions within 10 ms, all within 100 ms.
        {
            "interval": "1m",
            "input_series": [
                series(acquire, "gatekeeper-a", "0+10x120", le="0.01"),
                series(acquire, "gatekeeper-a", "0+20x120", le="0.1"),
                series(acquire, "gatekeeper-a", "0+20x120", le="+Inf"),
            ],
            "promql_expr_test": [
                expect(p50, ('{instance="gatekeeper-a:8000"}', 0.01)),
                expect(p99, ('{instance="gatekeeper-a:8000"}', 0.01 + 0.09 * 0.98)),
            ],
        },
    ]
    result = run_promtool_unit_test(promtool, tmp_path, [], tests)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_query_checks_reject_broken_and_misspelled_queries(promtool: str, tmp_path: Path) -> None:
    """The checks are not vacuous: a syntax error, a typo'd metric or label value is caught."""
    good = "sum(rate(asr_gatekeeper_oom_errors_total[5m]))"
    assert promql_errors(promtool, [good], tmp_path) is None
    broken = "sum(rate(asr_gatekeeper_oom_errors_total[5m])"
    error = promql_errors(promtool, [good, broken], tmp_path)
    assert error is not None
    assert "dashboard:check:1" in error or "parse error" in error, error
    assert contract_violations("rate(asr_gatekeeper_oom_error_total[5m])") == [
        "unknown metric asr_gatekeeper_oom_error_total"
    ]
    assert contract_violations('asr_gatekeeper_rejected_total{reason="queue_ful"}') != []
    assert contract_violations("rate(asr_gatekeeper_queue_wait_seconds_bucket[5m])") == []
    assert contract_violations("asr_gatekeeper_active_tasks_bucket") != []
    assert substitute_variables("rate(x[$__rate_interval])", set()) == "rate(x[5m])"
    assert substitute_variables('x{instance=~"$instance"}', {"instance"}) == 'x{instance=~".*"}'
    assert substitute_variables('x{instance=~"$nope"}', {"instance"}) == 'x{instance=~"$nope"}'
