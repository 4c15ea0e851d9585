"""The benchmark harness in quick mode: it runs end to end and writes complete, sane results.

Timing targets are printed by the harness, never asserted here (a shared CI machine makes them
noise); what is asserted is that every scenario and reference is there, the figures are
plausible, and the correctness checks hold: exactly limit + queue tasks admitted in the flood,
and never more tasks on the simulated GPU than the limit.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.bench]

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"haproxy": "haproxy", "nginx": "nginx", "wrk": "wrk"}
# As shipped (on uvloop, a dependency), and on Python's own loop (ASR_EVENT_LOOP=asyncio).
GATEKEEPERS = ["gatekeeper", "gatekeeper_asyncio"]
_RUN_LIMIT = 240  # seconds; the quick run itself takes well under two minutes

_cache: dict[str, Any] = {}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-quick")


def _run(out: Path) -> tuple[dict[str, Any], str, str]:
    """Run `python -m bench --quick` once for the module; later calls get the same result."""
    if "failure" in _cache:
        pytest.fail(_cache["failure"])
    if "result" not in _cache:
        for tool, package in TOOLS.items():
            if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
                _cache["failure"] = (
                    f"{tool} is missing: install the Debian package {package} "
                    f"(apt-get install {package}, or ./scripts/setup --test-tools)"
                )
                pytest.fail(_cache["failure"])
        done = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=_RUN_LIMIT,
            check=False,
        )
        if done.returncode != 0:
            _cache["failure"] = (
                f"python -m bench --quick exited {done.returncode}:\n" + (done.stderr[-6000:])
            )
            pytest.fail(_cache["failure"])
        data = json.loads((out / "results.json").read_text(encoding="utf-8"))
        markdown = (out / "RESULTS.md").read_text(encoding="utf-8")
        _cache["result"] = (data, markdown, done.stderr)
    result: tuple[dict[str, Any], str, str] = _cache["result"]
    return result


def test_quick_run_covers_every_scenario_and_reference(bench_out: Path) -> None:
    data, _, _ = _run(bench_out)
    assert data["mode"] == "quick"
    assert data["errors"] == {}
    scenarios = data["scenarios"]
    assert set(scenarios) == {"overhead", "uploads", "overload", "goodput"}
    assert set(scenarios["overhead"]["references"]) == {
        "direct",
        "haproxy",
        "nginx",
        "aiohttp_floor",
        *GATEKEEPERS,
    }
    assert set(scenarios["uploads"]["references"]) == {"direct", "haproxy", "nginx", *GATEKEEPERS}
    assert set(scenarios["overload"]["references"]) == {"haproxy", *GATEKEEPERS}
    setups = {
        (row["card"], row["setup"], row["limit"], row["start_limit"])
        for row in scenarios["goodput"]["rows"]
    }
    config = data["config"]
    assert setups == {
        (card, kind, limit, start)
        for card in config["cards"]
        for kind, limit, start in [
            ("direct", None, None),
            *[
                (name, limit, None)
                for name in ("haproxy", "gatekeeper")
                for limit in config["limits"]
            ],
            *[("gatekeeper", None, start) for start in config["adaptive_starts"]],
        ]
    }
    machine = data["machine"]
    for key in ("cpu_model", "cores", "memory_gib", "python", "aiohttp", "haproxy", "nginx"):
        assert machine[key], key


def test_overload_admits_exactly_limit_plus_queue(bench_out: Path) -> None:
    """The correctness check of the flood: 22 admitted at limit 2 + queue 20, all others 503."""
    data, _, _ = _run(bench_out)
    setup = data["scenarios"]["overload"]["setup"]
    expected = setup["limit"] + setup["queue"]
    for name, res in data["scenarios"]["overload"]["references"].items():
        assert res["admitted"] == expected, name
        assert res["refused"] == setup["tasks"] - expected, name
        assert res["other_statuses"] == {}, name
        assert res["client_errors"] == 0, name
        assert res["admitted_exactly"] is True, name
        assert res["refusal_latency"]["n"] == res["refused"], name
        probes = res["probes_during_burst"]
        assert probes["errors"] == 0, name
        assert set(probes["statuses"]["/metrics"]) == {"200"}, name
    reasons = data["scenarios"]["overload"]["references"]["gatekeeper"]["refusal_reasons"]
    assert reasons == {"queue_full": setup["tasks"] - expected}


def test_overhead_and_upload_figures_are_sane(bench_out: Path) -> None:
    data, _, _ = _run(bench_out)
    for name, res in data["scenarios"]["overhead"]["references"].items():
        assert res["bad_answers"] == 0, name
        assert res["rps_non_2xx"] == 0, name
        assert res["rps"] > 0, name
        assert res["latency_p50_ms"] > 0, name
        assert res["latency_p99_ms"] >= res["latency_p50_ms"], name
    uploads = data["scenarios"]["uploads"]
    for name, res in uploads["references"].items():
        assert res["failed"] == 0, (name, res["failures"])
        assert res["mb_per_s"] > 0, name
    assert [q["upload_mb"] for q in uploads["queued"]] == data["config"]["queued_sizes_mb"]
    for queued in uploads["queued"]:
        assert queued["failed"] == 0, queued["failures"]
        assert queued["all_queued_spooled"] is True
        assert queued["peak_rss_mib"] >= queued["idle_peak_rss_mib"] > 0


def test_goodput_rows_replay_one_schedule_and_keep_the_limit(bench_out: Path) -> None:
    data, _, _ = _run(bench_out)
    rows = data["scenarios"]["goodput"]["rows"]
    arrivals = data["scenarios"]["goodput"]["setup"]["arrivals"]
    for row in rows:
        assert row["tasks"] == arrivals * row["runs"], row["setup"]
        assert row["succeeded"] + row["failed"] + row["refused"] == row["tasks"], row
        assert row["succeeded"] > 0, row
        assert row["goodput_audio_min_per_min"] > 0, row
        if row["limit"] is not None:
            assert row["max_active_on_gpu"] <= row["limit"], row
            assert row["queue_waits_logged"] > 0, row
        if row["adaptive"]:  # it may move, but never past its bound, and says where it ended
            assert row["max_active_on_gpu"] <= data["config"]["adaptive_maximum"], row
            assert row["adaptive_runs"], row
            for path in row["adaptive_runs"]:
                assert 1 <= path["final_limit"] <= data["config"]["adaptive_maximum"], path
    gatekeeper_rows = [row for row in rows if row["setup"] == "gatekeeper"]
    assert all(row["peak_rss_mib"] > 0 for row in gatekeeper_rows)


def test_markdown_shows_tables_machine_and_targets(bench_out: Path) -> None:
    data, markdown, stderr = _run(bench_out)
    for heading in (
        "## Machine",
        "## Targets",
        "## 1. Overhead",
        "## 2. Big uploads",
        "## 3. Overload",
        "## 4. GPU goodput",
    ):
        assert heading in markdown, heading
    ids = {target["id"] for target in data["targets"]}
    assert ids == {
        "overhead_added_p50",
        "overhead_rps",
        "upload_throughput",
        "queued_upload_rss",
        "refusal_p99",
        "admitted_exactly",
        "goodput_vs_haproxy",
        "success_rate_vs_haproxy",
        "adaptive_vs_best_fixed",
    }
    for target in data["targets"]:
        assert target["target"] in markdown
        assert target["measured"] in markdown
    assert data["machine"]["cpu_model"] in markdown
    assert "wrote" in stderr  # the harness prints where the results went, and each target
