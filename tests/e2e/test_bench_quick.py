"""The benchmark harness in quick mode: it runs end to end and writes complete, sane results.

Timing targets are printed by the harness, never asserted here (a shared CI machine makes them
noise); what is asserted is that every scenario and reference is there, the figures are
plausible, and the correctness checks hold: exactly limit + queue tasks admitted in the flood,
and never more tasks on the simulated GPU than the limit.

The run must also leave no process behind (issue #18: nginx's worker outlived every run). The
test process becomes a child subreaper for the run (Linux's PR_SET_CHILD_SUBREAPER), so whatever
the bench started and left orphaned is re-parented to it instead of init, and found in /proc.
"""

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.procs import Procs, free_port
from bench.scenarios import memory as memory_scenario
from bench.scenarios import replicas as replicas_scenario
from bench.workload import schedule

pytestmark = [pytest.mark.e2e, pytest.mark.bench]

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"haproxy": "haproxy", "nginx": "nginx", "wrk": "wrk", "redis-server": "redis-server"}
# As shipped (on uvloop, a dependency), and on Python's own loop (ASR_EVENT_LOOP=asyncio).
GATEKEEPERS = ["gatekeeper", "gatekeeper_asyncio"]
_RUN_LIMIT = 240  # seconds; the quick run itself takes well under two minutes

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_WORKERS_WITHIN = 10.0  # seconds for nginx's master to fork its worker

_cache: dict[str, Any] = {}


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process from /proc, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and ")"
    return fields[0], int(fields[1]), int(fields[2])


def _processes() -> dict[int, tuple[str, int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _alive(stat: tuple[str, int, int] | None) -> bool:
    return stat is not None and stat[0] not in ("Z", "X")


def _live_in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    return [pid for pid, stat in _processes().items() if _alive(stat) and stat[2] == pgid]


def _children(parent: int) -> set[int]:
    return {pid for pid, stat in _processes().items() if stat[1] == parent}


def _describe(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        cmdline = b"?"
    return f"{pid} {cmdline.decode(errors='replace')}"


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _run_reaping_orphans(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run `argv` as a subreaper; also the processes it left alive, which are then killed."""
    before = _children(os.getpid())
    _set_subreaper(True)
    try:
        done = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=_RUN_LIMIT, check=False
        )
    finally:
        _set_subreaper(False)  # orphans re-parented until now stay ours; later ones go to init
        orphans = _children(os.getpid()) - before
        survivors = [pid for pid in orphans if _alive(_stat(pid))]
        left = [_describe(pid) for pid in survivors]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        for pid in orphans:  # reap them, zombies included (they are our children now)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return done, left


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
        done, _cache["left_alive"] = _run_reaping_orphans(
            [sys.executable, "-m", "bench", "--quick", "--out", str(out)]
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
    """Every scenario ran every reference and the machine description is complete."""
    data, _, _ = _run(bench_out)
    assert data["mode"] == "quick"
    assert data["errors"] == {}
    scenarios = data["scenarios"]
    assert set(scenarios) == {
        "overhead",
        "uploads",
        "overload",
        "goodput",
        "pool",
        "memory",
        "replicas",
    }
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
    """Overhead and upload figures are positive, ordered and free of failed requests."""
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
    """Every goodput row replays the same arrivals and never exceeds its limit on the GPU."""
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


def test_pool_rows_use_every_card_and_keep_each_cards_limit(bench_out: Path) -> None:
    """The pool scenario: HAProxy and the gatekeeper over three simulators replay one schedule;
    every card gets tasks and never more at once than its own limit; the ceiling is the sum of
    each card's best single-card goodput, every single-card row within its limit too."""
    data, _, _ = _run(bench_out)
    pool = data["scenarios"]["pool"]
    config = data["config"]
    cards, limits = config["pool_cards"], config["pool_limits"]
    rows = pool["rows"]
    expected = {
        ("haproxy", False, False),
        ("gatekeeper", False, False),
        ("gatekeeper", True, False),
    }
    if config["pool_cooldown_off"]:
        expected.add(("gatekeeper", False, True))
    assert {(r["setup"], r["adaptive"], r["cooldown_off"]) for r in rows} == expected
    arrivals = pool["setup"]["arrivals"]
    assert arrivals > max(s["arrivals"] for s in pool["setup"]["shares"].values())
    for row in rows:
        assert row["tasks"] == arrivals * row["runs"], row["label"]
        assert row["succeeded"] + row["failed"] + row["refused"] == row["tasks"], row["label"]
        assert row["goodput_audio_min_per_min"] > 0, row["label"]
        assert [c["card"] for c in row["per_card"]] == cards, row["label"]
        for card in row["per_card"]:
            assert card["tasks_started"] > 0, (row["label"], card)  # every card is used
            bound = config["adaptive_maximum"] if row["adaptive"] else card["limit"]
            assert card["max_active_seen"] <= bound, (row["label"], card)
        if not row["adaptive"]:
            assert row["limits"] == limits
            assert row["queue_waits_logged"] > 0, row["label"]
        assert row["vs_ceiling"] > 0, row["label"]
    for path in next(r for r in rows if r["adaptive"])["adaptive_runs"]:
        assert len(path["final_limits"]) == len(cards), path
        assert all(1 <= end <= config["adaptive_maximum"] for end in path["final_limits"]), path
    for row in pool["single_card_rows"]:
        assert row["card"] in cards
        assert row["succeeded"] + row["failed"] + row["refused"] == row["tasks"], row["label"]
        if row["limit"] is not None:
            assert row["max_active_on_gpu"] <= row["limit"], row["label"]
    ceiling = pool["ceiling"]
    assert [c["card"] for c in ceiling["per_card"]] == cards
    assert ceiling["goodput_audio_min_per_min"] == pytest.approx(
        sum(c["goodput_audio_min_per_min"] for c in ceiling["per_card"]), abs=0.01
    )


def test_memory_rows_read_the_files_and_the_true_figures_never_oversubscribe(
    bench_out: Path,
) -> None:
    """The memory scenario (#16): on each card the computed rows (oracle, oracle without queue
    limits, the policy's model) and every measured row; real WAV uploads whose lengths the
    gatekeeper and the simulator read right; with the true figures no task runs out of memory;
    the policy's own model keeps the backfill bound as the checker measures it."""
    data, _, _ = _run(bench_out)
    memory = data["scenarios"]["memory"]
    config = data["config"]
    arrivals = memory["setup"]["arrivals"]
    rows = memory["rows"]
    for card in config["memory_cards"]:
        mine = {
            (r["setup"], r["limit"] if r["setup"] in ("haproxy", "gatekeeper") else None): r
            for r in rows
            if r["card"] == card
        }
        assert set(mine) == {
            ("oracle", None),
            ("oracle_open", None),
            ("policy", None),
            ("memory", None),
            ("learned", None),
            ("adaptive", None),
            *[
                (kind, limit)
                for kind in ("haproxy", "gatekeeper")
                for limit in config["memory_limits"]
            ],
        }
        assert mine[("oracle", None)]["vs_oracle"] == 1.0
        for kind in ("oracle", "oracle_open", "policy"):
            row = mine[(kind, None)]
            assert row["computed"] is True
            assert row["failed"] == 0, row["label"]
            assert row["goodput_audio_min_per_min"] > 0, row["label"]
            assert row["succeeded"] + row["refused"] == arrivals, row["label"]
            # Clairvoyant: never more on the card than it holds (the reservation included).
            assert row["peak_memory_gib"] <= memory["setup"]["cards"][card]["total_gib"] + 1e-6
        assert mine[("policy", None)]["passed_over_bound"] == 0
        true = mine[("memory", None)]
        assert true["oom_answers"] == 0, true
        assert true["failed"] == 0, true
        assert true["max_active_on_gpu"] <= config["memory_cap"]
        assert true["passed_over_bound"] is not None
        for row in mine.values():
            if row["computed"]:
                continue
            assert row["tasks"] == arrivals * row["runs"], row["label"]
            assert row["succeeded"] + row["failed"] + row["refused"] == row["tasks"], row["label"]
            assert row["succeeded"] > 0, row["label"]
            assert row["audio_lengths_checked"] > 0, row["label"]
            assert row["audio_lengths_wrong"] == [], row["label"]
        for path in mine[("learned", None)]["memory_runs"]:
            assert path["ended_at"]["learning"] is not None, path


def test_replicas_share_one_limit_and_time_every_acquisition(bench_out: Path) -> None:
    """The replicas scenario (#17): every setup timed without a failed request, and the
    replicas' acquire histogram timed at least one call to Redis for each timed task; in the
    flood, replicas sharing through Redis never put more than the limit on the upstream and
    give every lease back, while three replicas without Redis put three limits there (the
    flood would see an oversubscription)."""
    data, _, _ = _run(bench_out)
    replicas = data["scenarios"]["replicas"]
    setup = replicas["setup"]
    limit, queue = setup["limit"], setup["queue_per_replica"]
    keys = {"single", "three", "single_redis", "three_redis"}
    assert set(replicas["latency"]) == {"direct", "nginx", *keys}
    assert setup["redis_ping"]["n"] > 0
    assert setup["bare_leases"]["acquire"]["n"] == setup["bare_leases"]["release"]["n"] > 0
    for name, row in replicas["latency"].items():
        assert row["bad_answers"] == 0, name
        assert row["requests_timed"] == setup["latency_requests_per_round"], name
        assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0, name
        if row.get("redis"):
            assert row["cluster_metrics"] is True, name
            assert row["acquire"]["acquisitions"] >= row["requests_timed"], name
            assert row["acquire"]["p50_ms"] is not None, name
            assert row["redis_errors"] == 0, name
            assert row["leases_lost"] == 0, name
        elif name in keys:
            assert row["cluster_metrics"] is False, name
    flood = replicas["flood"]
    assert set(flood) == keys
    for name, row in flood.items():
        assert row["sent"] == row["tasks"] == setup["burst_tasks"], name
        assert row["other_statuses"] == {}, name
        assert row["client_errors"] == 0, name
        assert set(row["refusal_reasons"]) == {"queue_full"}, name
        assert row["admitted"] + row["refused"] == row["tasks"], name
        if row["redis"]:
            assert row["max_in_flight_at_upstream"] == limit, name
            assert row["leases_left_after_drain"] == 0, name
        else:
            assert row["max_in_flight_at_upstream"] == row["replicas"] * limit, name
            assert row["admitted"] == row["replicas"] * (limit + queue), name
            assert row["leases_left_after_drain"] is None, name


def test_replicas_sharing_a_limit_admit_it_once_and_a_queue_each(bench_out: Path) -> None:
    """Replicas sharing through Redis admit the limit once and ASR_MAX_QUEUE each: a slot
    free on a replica while its tasks wait for a lease is no room for arrivals."""
    data, _, _ = _run(bench_out)
    replicas = data["scenarios"]["replicas"]
    limit, queue = replicas["setup"]["limit"], replicas["setup"]["queue_per_replica"]
    for name, row in replicas["flood"].items():
        if row["redis"]:
            assert row["admitted"] == limit + row["replicas"] * queue, name
            assert row["admitted_as_expected"] is True, name


def test_histogram_quantiles_from_buckets_as_prometheus_estimates_them() -> None:
    """The acquire histogram's p50/p99 are estimated as `histogram_quantile` does: linear
    within the bucket the rank falls in, the top finite bound in the +Inf bucket."""
    inf = float("inf")
    buckets = [(0.001, 50.0), (0.002, 90.0), (0.005, 100.0), (inf, 100.0)]
    assert replicas_scenario.bucket_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert replicas_scenario.bucket_quantile(buckets, 0.25) == pytest.approx(0.0005)
    assert replicas_scenario.bucket_quantile(buckets, 0.7) == pytest.approx(0.0015)
    assert replicas_scenario.bucket_quantile(buckets, 0.99) == pytest.approx(0.0047)
    slow = [(0.001, 0.0), (0.002, 1.0), (inf, 3.0)]
    assert replicas_scenario.bucket_quantile(slow, 0.99) == pytest.approx(0.002)
    assert replicas_scenario.bucket_quantile([(0.001, 0.0), (inf, 0.0)], 0.5) is None


def test_the_backfill_check_finds_an_unbounded_pass() -> None:
    """The bound check against the simulator's model: the clairvoyant first fit (it passes
    without bound) breaks a 120 s bound somewhere in an hour, the bounded policy never does."""
    cards = {"default": memory_scenario.card_config("default")}
    arrivals = schedule(seed=1, rate_per_minute=10, minutes=60)
    for sim in cards.values():
        rules = {"queue_timeout": 600.0, "max_queue": 120}
        unbounded = memory_scenario.simulate(arrivals, sim, backfill=None, **rules)
        bounded = memory_scenario.simulate(arrivals, sim, backfill=120.0, **rules)
        check = {"minutes": 60.0, "passing": True, "backfill": 120.0, "slack": 1e-6}
        assert memory_scenario.figures([unbounded], **check)["passed_over_bound"] > 0
        assert memory_scenario.figures([bounded], **check)["passed_over_bound"] == 0


def test_a_run_of_some_scenarios_keeps_the_other_results(tmp_path: Path) -> None:
    """`--scenarios pool` into bench/results replaces the pool's results and keeps the rest
    (and the header of the run that made them); a run of another mode replaces everything."""
    earlier = {
        "schema": 1,
        "mode": "full",
        "command": "python -m bench --profile",
        "scenarios": {"goodput": {"rows": [1]}, "pool": {"rows": [2]}},
        "errors": {"pool": "RuntimeError: boom"},
        "profiles": {"overhead/gatekeeper": {"samples": 3}, "pool/gatekeeper": {"samples": 1}},
        "config": {"time_scale": 120.0},
        "notes": ["shared machine"],
    }
    (tmp_path / "results.json").write_text(json.dumps(earlier), encoding="utf-8")
    assert report.previous(tmp_path, "quick") is None
    previous = report.previous(tmp_path, "full")
    assert previous == earlier
    now = {
        "schema": 1,
        "mode": "full",
        "command": "python -m bench --scenarios pool",
        "scenarios": {"pool": {"rows": [3]}},
        "errors": {},
        "profiles": {},
        "config": {"time_scale": 60.0, "pool_cards": ["default"]},
        "notes": ["shared machine", "another"],
    }
    merged = report.merge(previous, now)
    assert merged["scenarios"] == {"goodput": {"rows": [1]}, "pool": {"rows": [3]}}
    assert merged["errors"] == {}
    assert merged["profiles"] == {"overhead/gatekeeper": {"samples": 3}}
    assert merged["command"] == "python -m bench --profile"
    assert merged["config"] == {"time_scale": 120.0, "pool_cards": ["default"]}
    assert merged["notes"] == ["shared machine"]


def test_markdown_shows_tables_machine_and_targets(bench_out: Path) -> None:
    """RESULTS.md has every section, the machine and every target with its measurement."""
    data, markdown, stderr = _run(bench_out)
    for heading in (
        "## Machine",
        "## Targets",
        "## 1. Overhead",
        "## 2. Big uploads",
        "## 3. Overload",
        "## 4. GPU goodput",
        "## 5. A pool of cards",
        "## 6. Admission by GPU memory",
        "## 7. Replicas",
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
        "pool_vs_haproxy",
        "pool_vs_ceiling",
        "memory_true_vs_oracle",
        "memory_learned_vs_oracle",
        "memory_short_wait",
        "memory_backfill_bound",
        "replicas_coordination_latency",
        "replicas_refusal_rate",
        "replicas_limit_held",
    }
    for target in data["targets"]:
        assert target["target"] in markdown
        assert target["measured"] in markdown
    assert data["machine"]["cpu_model"] in markdown
    assert "wrote" in stderr  # the harness prints where the results went, and each target


def test_quick_run_leaves_no_process_behind(bench_out: Path) -> None:
    """No process the bench started (nginx's workers included) is alive after the run."""
    _run(bench_out)
    assert _cache["left_alive"] == [], "still alive after the run (now killed)"


async def _forked(parent: int) -> list[int]:
    """The live children of `parent`, waiting (polling) until it has forked at least one."""
    deadline = time.monotonic() + _WORKERS_WITHIN
    while not (children := [pid for pid in _children(parent) if _alive(_stat(pid))]):
        assert time.monotonic() < deadline, f"{_describe(parent)} forked nothing in time"
        await asyncio.sleep(0.02)
    return children


# Each process the bench starts leads its own session: its process group is numbered by its pid.


async def test_nginx_ends_with_its_worker(tmp_path: Path) -> None:
    """Ending nginx (as every scenario and the run's end do) ends its worker processes too."""
    procs = Procs(tmp_path)
    nginx = await procs.nginx(free_port())  # nothing is proxied: the upstream need not exist
    try:
        workers = await _forked(nginx.pid)
        await procs.kill(nginx)
        assert not [pid for pid in workers if _alive(_stat(pid))], "nginx's worker outlived it"
        assert nginx.process.returncode == 0, "nginx did not end on its own stop signal"
        assert _live_in_group(nginx.pid) == []
    finally:
        await procs.aclose()
        _kill_group(nginx.pid)


_FORKS_A_SLEEPER = """\
import socket, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
time.sleep(600)
"""


async def test_kill_ends_what_the_process_forked(tmp_path: Path) -> None:
    """The last resort: what a SIGKILLed process forked is killed with its process group."""
    procs = Procs(tmp_path)
    port = free_port()
    proc = await procs._spawn("forks", [sys.executable, "-c", _FORKS_A_SLEEPER, str(port)], port)
    try:
        (sleeper,) = await _forked(proc.pid)
        await procs.kill(proc)
        assert proc.process.returncode == -signal.SIGKILL
        assert not _alive(_stat(sleeper)), "the forked child outlived its killed parent"
        assert _live_in_group(proc.pid) == []
    finally:
        await procs.aclose()
        _kill_group(proc.pid)


def _kill_group(pgid: int) -> None:
    """Clean up after a failed check: SIGKILL whatever is left in the group."""
    if _live_in_group(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
