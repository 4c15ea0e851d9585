"""The external tools end-to-end tests drive, found or failed for loudly (never skipped)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = [
    "CLUSTER_METRICS",
    "EXPORTED_METRICS",
    "HISTOGRAMS",
    "METRIC_NAME",
    "ROOT",
    "contract_violations",
    "require_tool",
    "run_promtool",
]

ROOT = Path(__file__).parents[2]


def require_tool(command: str, package: str) -> str:
    """The path of `command`, or a test failure saying which Debian package to install."""
    path = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(
            f"{command} is not installed: run ./scripts/setup --test-tools, or install the "
            f"Debian package yourself (apt-get install -y {package}). These tests do not skip.",
            pytrace=False,
        )
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool from the repository root and capture what it says."""
    return subprocess.run(
        [promtool, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


# The metrics contract (SPEC.md, "Metrics"; pool-contract.md for several servers):
# name -> {label: allowed values, or None when any value goes (a server's host:port)}. A label
# a metric does not carry is reported, so a per-server selector on a total
# (asr_gatekeeper_tasks_total{upstream="gpu0:9000"}) is caught.
_TASK_OUTCOMES = {"success", "failed", "client_error", "cancelled", "rejected"}
_REJECT_REASONS = {"queue_full", "queue_timeout", "shutting_down", "coordination_unavailable"}
_ATTEMPT_OUTCOMES = {"ok", "client_error", "oom", "crash", "error", "timeout"}
_RETRY_OUTCOMES = {"oom", "crash", "error", "timeout"}
_LIMIT_REASONS = {"oom", "crash", "stable", "ceiling_faded", "shared"}
_LOST_REASONS = {"expired", "unconfirmed"}
_UPSTREAM: dict[str, set[str] | None] = {"upstream": None}
EXPORTED_METRICS: dict[str, dict[str, set[str] | None]] = {
    # Totals over every server (unlabelled).
    "asr_gatekeeper_max_concurrent": {},
    "asr_gatekeeper_active_tasks": {},
    "asr_gatekeeper_queued_tasks": {},
    "asr_gatekeeper_max_queue": {},
    "asr_gatekeeper_shutting_down": {},
    "asr_gatekeeper_upstream_in_flight": {},
    "asr_gatekeeper_retrying_tasks": {},
    "asr_gatekeeper_held_tasks": {},
    "asr_gatekeeper_uploading_tasks": {},
    "asr_gatekeeper_tasks_total": {"outcome": _TASK_OUTCOMES},
    "asr_gatekeeper_rejected_total": {"reason": _REJECT_REASONS},
    "asr_gatekeeper_retries_total": {"outcome": _RETRY_OUTCOMES},
    "asr_gatekeeper_queue_wait_seconds": {},
    "asr_gatekeeper_upstream_duration_seconds": {},
    "asr_gatekeeper_task_duration_seconds": {},
    # Per server, label upstream="host:port" (also with a single server).
    "asr_gatekeeper_upstream_up": _UPSTREAM,
    "asr_gatekeeper_upstream_max_concurrent": _UPSTREAM,
    "asr_gatekeeper_upstream_active_tasks": _UPSTREAM,
    "asr_gatekeeper_upstream_attempts_total": {**_UPSTREAM, "outcome": _ATTEMPT_OUTCOMES},
    "asr_gatekeeper_oom_errors_total": _UPSTREAM,
    "asr_gatekeeper_last_oom_timestamp_seconds": _UPSTREAM,
    "asr_gatekeeper_limit_changes_total": {**_UPSTREAM, "reason": _LIMIT_REASONS},
}
# Replicas (#17): only a gatekeeper with ASR_REDIS_URL exports these, one set per replica.
CLUSTER_METRICS: dict[str, dict[str, set[str] | None]] = {
    "asr_gatekeeper_cluster_redis_up": {},
    "asr_gatekeeper_cluster_lease_renewals_total": {},
    "asr_gatekeeper_cluster_leases_lost_total": {"reason": _LOST_REASONS},
    "asr_gatekeeper_cluster_redis_errors_total": {},
    "asr_gatekeeper_cluster_leases_held": _UPSTREAM,
    "asr_gatekeeper_cluster_acquire_seconds": {},
}
HISTOGRAMS = {
    "asr_gatekeeper_queue_wait_seconds",
    "asr_gatekeeper_upstream_duration_seconds",
    "asr_gatekeeper_task_duration_seconds",
    "asr_gatekeeper_cluster_acquire_seconds",
}
_CONTRACT = EXPORTED_METRICS | CLUSTER_METRICS
# Labels the contract fixes; any other label (job, instance, le) is free.
_CONTRACT_LABELS = {"outcome", "reason", "upstream"}

METRIC_NAME = re.compile(r"(asr_gatekeeper_[a-z_]+)(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def contract_violations(text: str) -> list[str]:
    """Metric names, labels and outcome/reason values in `text` the gatekeeper does not export."""
    problems: list[str] = []
    for match in METRIC_NAME.finditer(text):
        name, selector = match.group(1), match.group(2) or ""
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        metric = base if base in HISTOGRAMS else name
        if metric not in _CONTRACT:
            problems.append(f"unknown metric {name}")
            continue
        for label, op, value in _MATCHER.findall(selector):
            if label not in _CONTRACT_LABELS:
                continue
            labels = _CONTRACT[metric]
            if label not in labels:
                problems.append(f"{name} has no label {label}")
                continue
            allowed = labels[label]
            if allowed is None:
                continue
            # Plain alternatives of a regex matcher ("success|failed") are checked too.
            words = value.split("|") if op in ("=~", "!~") else [value]
            for word in words:
                if re.fullmatch(r"[a-z_]+", word) and word not in allowed:
                    problems.append(f'{name}{{{label}{op}"{value}"}}: no {label} "{word}"')
    return problems
