"""`gatekeeper check-config` with replicas sharing the limits through Redis (#17): the cluster,
the Redis URL with its password masked, the lease and its renewals, what a dead replica's slots
wait for, and warnings for a lease a stall can lose or one that idles the card too long."""

import argparse
import os

import pytest

from gatekeeper.commands.check_config import (
    add_check_config_arguments,
    masked_url,
    run_check_config,
)

UPSTREAM = ("--upstream-url", "http://whisper:9000")


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run check-config with these flags (no env file); its status, stdout and stderr."""
    parser = argparse.ArgumentParser()
    add_check_config_arguments(parser)
    status = run_check_config(parser.parse_args(["--env-file", os.devnull, *UPSTREAM, *argv]))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _cluster_block(out: str) -> list[str]:
    """The lines of the cluster, from its heading to the worst case."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Replicas"))
    end = next(i for i, line in enumerate(lines) if line.startswith("Worst case"))
    return lines[start:end]


def test_the_cluster_its_redis_and_its_lease(capsys: pytest.CaptureFixture[str]) -> None:
    """With ASR_REDIS_URL: the cluster's name, Redis, the lease renewed every third of it, the
    slots of a dead replica freed after one lease, the queue per replica; no warning."""
    status, out, err = _check(
        capsys, "--redis-url", "redis://redis:6379/0", "--cluster", "asr-prod",
        "--proxy-timeout", "4000",
    )  # fmt: skip
    assert (status, err) == (0, "")
    block = _cluster_block(out)
    assert block[0].startswith("Replicas (ASR_REDIS_URL): every gatekeeper with this Redis")
    assert block[1] == "  cluster: asr-prod (ASR_CLUSTER)"
    assert block[2] == "  Redis: redis://redis:6379/0"
    assert block[3].startswith("  lease: 15 s (ASR_REDIS_LEASE), renewed every 5 s;")
    assert "slower than 0.5 s counts as Redis unreachable (ASR_REDIS_TIMEOUT)" in block[3]
    assert "a replica that dies frees its slots within 15 s" in block[4]
    assert "never sooner (the GPU may still be on its tasks)" in block[4]
    assert "each replica's own (ASR_MAX_QUEUE counts per replica)" in out
    assert "503 coordination_unavailable" in out
    assert "OK: --proxy-timeout: 4000 s" in out


def test_one_gatekeeper_says_nothing_of_a_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    """Without ASR_REDIS_URL (or with it empty) check-config reads as before: no cluster."""
    for argv in ([], ["--redis-url", ""]):
        status, out, err = _check(capsys, *argv)
        assert (status, err) == (0, "")
        assert "Replicas" not in out
        assert "ASR_REDIS" not in out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://gatekeeper:s3cret@redis.internal:6380/2", "rediss://gatekeeper:***@redis.internal:6380/2"),
        ("redis://redis:6379/0?password=s3cret&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("unix:///run/redis/redis.sock?db=1&password=s3cret", "unix:///run/redis/redis.sock?db=1&password=***"),
        ("redis://gatekeeper@redis:6379", "redis://gatekeeper@redis:6379"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)  # fmt: skip
def test_a_password_in_the_url_is_never_shown(
    capsys: pytest.CaptureFixture[str], url: str, shown: str
) -> None:
    """A password in the URL's user part or its query is masked; the rest is shown as given."""
    assert masked_url(url) == shown
    status, out, err = _check(capsys, "--redis-url", url)
    assert status == 0
    assert f"  Redis: {shown}" in out.splitlines()
    assert "s3cret" not in out + err


@pytest.mark.parametrize(
    ("lease", "timeout", "renewal"),
    [("3", "0.5", "1"), ("30", "1", "10"), ("10", "0.5", "3.33")],
)
def test_renewals_come_every_third_of_the_lease(
    capsys: pytest.CaptureFixture[str], lease: str, timeout: str, renewal: str
) -> None:
    """The lease as set, renewed every third of it, and the Redis timeout as set."""
    _, out, _ = _check(
        capsys, "--redis-url", "redis://redis", "--redis-lease", lease, "--redis-timeout", timeout
    )
    line = _cluster_block(out)[3]
    assert line.startswith(f"  lease: {lease} s (ASR_REDIS_LEASE), renewed every {renewal} s;")
    assert f"slower than {timeout} s" in line


def test_a_lease_a_stall_can_lose_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    """A lease under 3 s: a warning on stderr (a GC pause loses leases); still exit 0."""
    status, out, err = _check(
        capsys, "--redis-url", "redis://redis", "--redis-lease", "2", "--redis-timeout", "0.2"
    )
    assert status == 0
    assert "lease: 2 s (ASR_REDIS_LEASE), renewed every 0.67 s" in out
    (warning,) = err.splitlines()
    assert warning.startswith("WARNING: ASR_REDIS_LEASE=2 s: a replica that stalls that long")
    assert "use 3 s or more" in warning


@pytest.mark.parametrize(
    ("argv", "than"),
    [
        (["--redis-lease", "120"], "longer than 60 s, longer than many whole tasks"),
        (
            ["--redis-lease", "45", "--request-timeout", "30"],
            "longer than ASR_REQUEST_TIMEOUT=30 s, the longest one attempt may run",
        ),
    ],
)
def test_a_lease_that_idles_the_card_is_warned_about(
    capsys: pytest.CaptureFixture[str], argv: list[str], than: str
) -> None:
    """A lease longer than a minute, or than one attempt may run: a dead replica's slots stay
    taken that long, and the card idles on them."""
    status, _, err = _check(capsys, "--redis-url", "redis://redis", *argv)
    assert status == 0
    (warning,) = err.splitlines()
    assert than in warning
    assert "a replica that dies" in warning


@pytest.mark.parametrize("lease", ["3", "15", "60"])
def test_leases_between_3_s_and_a_minute_pass_quietly(
    capsys: pytest.CaptureFixture[str], lease: str
) -> None:
    """3 s to 60 s (at the default ASR_REQUEST_TIMEOUT) warn of nothing."""
    status, _, err = _check(capsys, "--redis-url", "redis://redis", "--redis-lease", lease)
    assert (status, err) == (0, "")


@pytest.mark.parametrize(
    ("argv", "shared"),
    [
        ([], ["last OOM"]),
        (["--adaptive", "true", "--max-concurrent", "3"], ["last OOM", "adaptive limit"]),
        (["--gpu-memory-gib", "18", "--max-concurrent", "4"], ["last OOM", "memory budget"]),
        (
            ["--gpu-memory-gib", "18", "--max-concurrent", "4", "--adaptive", "true"],
            ["last OOM", "adaptive limit", "memory budget", "learned memory figures"],
        ),
    ],
)
def test_what_else_the_replicas_share(
    capsys: pytest.CaptureFixture[str], argv: list[str], shared: list[str]
) -> None:
    """Besides the slots, the replicas share each card's last OOM; adaptive, its limit; by
    memory, its budget (and, adaptive, the learned figures): one line says which."""
    status, out, _ = _check(capsys, "--redis-url", "redis://redis", *argv)
    assert status == 0
    (line,) = [ln for ln in _cluster_block(out) if ln.startswith("  shared as well: ")]
    kinds = ("last OOM", "adaptive limit", "memory budget", "learned memory figures")
    assert [kind for kind in kinds if kind in line] == shared


def test_a_url_redis_cannot_use_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL that is not Redis's (http://) stops check-config with exit 2, naming the setting."""
    status, out, err = _check(capsys, "--redis-url", "http://redis:6379")
    assert status == 2
    assert out == ""
    assert err.startswith("gatekeeper: ASR_REDIS_URL (--redis-url)=")


def test_the_worst_case_is_the_same_with_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    """Sharing the slots adds no wait to one task's worst case: a lease is waited for within
    ASR_QUEUE_TIMEOUT like a slot; the nginx verdict is the same."""
    _, alone, _ = _check(capsys, "--proxy-timeout", "2000")
    _, replica, _ = _check(capsys, "--redis-url", "redis://redis", "--proxy-timeout", "2000")
    worst = [line for line in alone.splitlines() if "Replicas" not in line]
    assert [line for line in replica.splitlines() if line not in _cluster_block(replica)] == worst
