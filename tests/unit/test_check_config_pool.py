"""`gatekeeper check-config` with several Whisper servers (#15): each server with its limit, the
total and the queue, notes for a pool, and the worst case of one task (the same as for one
server: a retry may land on another server but waits no longer for it)."""

import argparse
import os
from pathlib import Path

import pytest

from gatekeeper.commands.check_config import add_check_config_arguments, run_check_config

POOL = "http://gpu0:9000,http://gpu1:9000,http://gpu2:9000"
SHIPPED_CONF = Path(__file__).resolve().parents[2] / "nginx" / "gatekeeper.conf"


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run check-config with these flags (no env file); its status, stdout and stderr."""
    parser = argparse.ArgumentParser()
    add_check_config_arguments(parser)
    status = run_check_config(parser.parse_args(["--env-file", os.devnull, *argv]))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _worst_case_block(out: str) -> list[str]:
    """The lines of the worst case, from its heading to the nginx line (the pool line left out)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Worst case"))
    end = next(i for i, line in enumerate(lines) if line.startswith("nginx's"))
    return [line for line in lines[start:end] if not line.startswith("With ")]


def test_each_server_its_limit_the_total_and_the_queue(capsys: pytest.CaptureFixture[str]) -> None:
    """Each server by name and URL with its own limit, then the total (the sum) and the queue,
    10 × the total by default, and how long its last place may wait."""
    status, out, err = _check(
        capsys, "--upstream-url", POOL, "--max-concurrent", "3,2,1", "--proxy-timeout", "3000"
    )
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("3 Whisper servers (ASR_UPSTREAM_URL; one queue for all")
    assert [line.split() for line in lines[1:4]] == [
        ["gpu0:9000", "http://gpu0:9000", "3", "at", "a", "time"],
        ["gpu1:9000", "http://gpu1:9000", "2", "at", "a", "time"],
        ["gpu2:9000", "http://gpu2:9000", "1", "at", "a", "time"],
    ]
    assert lines[4] == "  total: 6 at a time (the sum of the limits)"
    assert lines[5] == "  queue: 60 places (ASR_MAX_QUEUE unset: 10 × 6, the sum of the limits)"
    assert "waits for about 10 task(s) per slot (60 ÷ 6)" in lines[6]
    assert "ASR_QUEUE_TIMEOUT=600 s only if tasks average 60 s or less" in lines[6]
    assert "OK: --proxy-timeout: 3000 s" in out


def test_one_server_reads_as_before_with_its_limit_and_queue(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One server: its line and the queue, no total and no pool notes; the worst case as ever."""
    status, out, _ = _check(
        capsys, "--upstream-url", "http://whisper:9000", "--max-concurrent", "2"
    )
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "Whisper server (ASR_UPSTREAM_URL):"
    assert lines[1].split() == ["whisper:9000", "http://whisper:9000", "2", "at", "a", "time"]
    assert lines[2] == "  queue: 20 places (ASR_MAX_QUEUE unset: 10 × 2, the limit)"
    assert "total:" not in out
    assert "NOTE" not in out
    assert "servers the worst case" not in out
    assert "1958 s" in out
    assert "2715 s" in out


@pytest.mark.parametrize(
    "settings",
    [
        [],  # the seed's defaults: a cool-down, 3 retries
        ["--oom-cooldown", "0"],  # a retry waits for a slot on any server
        ["--retry-on-timeout", "true", "--timeout-hold", "120"],
        ["--adaptive", "true", "--max-retries", "5", "--retry-delay", "15"],
        ["--max-retries", "0"],
    ],
)
def test_the_worst_case_of_a_task_is_the_same_for_a_pool(
    capsys: pytest.CaptureFixture[str], settings: list[str]
) -> None:
    """A pool's worst case is one server's, part by part: the settings apply to each server
    alike, a retry on another server waits no longer than one on the same, the cool-down comes
    once. The pool says so in one line, naming the retry rule in force."""
    _, one, _ = _check(
        capsys, "--upstream-url", "http://gpu0:9000", "--max-concurrent", "3", *settings
    )
    _, pool, _ = _check(capsys, "--upstream-url", POOL, "--max-concurrent", "3,2,1", *settings)
    assert _worst_case_block(pool) == _worst_case_block(one)
    [said] = [line for line in pool.splitlines() if line.startswith("With 3 servers")]
    assert "the worst case is the same" in said
    if "--oom-cooldown" in settings or "--adaptive" in settings:
        assert "takes the first slot free on any server" in said
    else:
        assert "moves only to a slot that is free at once" in said
    # The nginx line asks for the same timeout.
    nginx = [line for line in one.splitlines() if line.startswith("nginx's")]
    assert nginx == [line for line in pool.splitlines() if line.startswith("nginx's")]


def test_a_pool_compared_with_the_shipped_nginx_config(capsys: pytest.CaptureFixture[str]) -> None:
    """--nginx-conf works for a pool as for one server: the shipped file's timeouts cover the
    default worst case; with scheme C (5 retries, 15 s) they are too short."""
    status, out, _ = _check(
        capsys,
        "--upstream-url",
        POOL,
        "--max-concurrent",
        "3,2,1",
        "--nginx-conf",
        str(SHIPPED_CONF),
    )
    assert status == 0
    assert "OK: " in out
    status, out, err = _check(
        capsys,
        *("--upstream-url", POOL, "--max-concurrent", "3,2,1"),
        *("--max-retries", "5", "--retry-delay", "15", "--nginx-conf", str(SHIPPED_CONF)),
    )
    assert status == 1
    assert "TOO SHORT" in out
    assert "5700s" in err


def test_uneven_limits_get_a_note_and_no_failure(capsys: pytest.CaptureFixture[str]) -> None:
    """A server allowed many more tasks than another is fine (cards of different memory): a note
    names both and points at tune; the exit status stays 0. Limits less than 2× apart: no note."""
    status, out, _ = _check(
        capsys, "--upstream-url", POOL, "--max-concurrent", "8,4,2", "--proxy-timeout", "1h"
    )
    assert status == 0
    [note] = [line for line in out.splitlines() if line.startswith("NOTE")]
    assert "gpu0:9000 may run 8 tasks at once, gpu2:9000 only 2" in note
    assert "gatekeeper tune URL,URL" in note
    _, out, _ = _check(capsys, "--upstream-url", POOL, "--max-concurrent", "3,2,2")
    assert "NOTE" not in out


def test_servers_on_one_host_and_no_retries_get_notes(capsys: pytest.CaptureFixture[str]) -> None:
    """Two servers on one host (maybe one GPU) and ASR_MAX_RETRIES=0 (a failed server's task is
    not retried elsewhere) are pointed out."""
    urls = "http://box:9000,http://box:9001,http://other:9000"
    status, out, _ = _check(capsys, "--upstream-url", urls, "--max-retries", "0")
    assert status == 0
    notes = [line for line in out.splitlines() if line.startswith("NOTE")]
    assert len(notes) == 2
    assert "box:9000, box:9001 run on one host" in notes[0]
    assert "their limits together must fit it" in notes[0]
    assert "ASR_MAX_RETRIES=0" in notes[1]
    assert "never retried, on that server or another" in notes[1]


def test_a_set_queue_shows_the_default_it_replaces(capsys: pytest.CaptureFixture[str]) -> None:
    """ASR_MAX_QUEUE given: its size and the default it replaces (10 × the total); the wait of
    its last place uses the total of the limits. An empty queue refuses at once."""
    _, out, _ = _check(capsys, "--upstream-url", POOL, "--max-concurrent", "2", "--max-queue", "15")
    assert "  queue: 15 places (ASR_MAX_QUEUE; the default would be 60)" in out
    assert "about 3 task(s) per slot (15 ÷ 6)" in out
    assert "average 200 s or less" in out
    _, out, _ = _check(capsys, "--upstream-url", POOL, "--max-queue", "0")
    assert "no task waits: one that finds every slot taken is refused at once" in out


def test_an_adaptive_pool_shows_each_range_and_the_queue_that_follows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Adaptive: each server from ASR_MIN_CONCURRENT to its own limit, where it starts, the
    total at the start and at most, and a queue of 10 × the sum of the limits in force."""
    status, out, _ = _check(
        capsys,
        *("--upstream-url", POOL, "--max-concurrent", "4,2,1", "--adaptive", "true"),
        *(
            "--initial-concurrent",
            "2",
        ),
    )
    assert status == 0
    lines = out.splitlines()
    assert lines[1].endswith("1 to 4 at a time (adaptive; starts at 2)")
    assert lines[2].endswith("1 to 2 at a time (adaptive; starts at 2)")
    assert lines[3].endswith("1 to 1 at a time (adaptive; starts at 1)")
    assert lines[4] == "  total: 5 at a time at the start, at most 7 (the sum of the limits)"
    assert "10 × the sum of the limits in force" in lines[5]
    assert "50 at the start, at most 70" in lines[5]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-concurrent", "3,2"], "ASR_MAX_CONCURRENT=3,2 has 2 values for 3 server(s)"),
        (["--max-concurrent", "3,0,1"], "each limit must be a whole number from 1 to 1024"),
    ],
)
def test_a_bad_list_of_limits_stops_with_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """A list of limits that does not match the servers is refused as `serve` refuses it."""
    status, out, err = _check(capsys, "--upstream-url", POOL, *argv)
    assert (status, out) == (2, "")
    assert message in err
    assert err.startswith("gatekeeper: ")


def test_the_same_server_twice_stops_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    """One server listed twice (a trailing slash makes no other server) is refused."""
    status, _, err = _check(capsys, "--upstream-url", "http://gpu0:9000,http://gpu0:9000/")
    assert status == 2
    assert "lists the same server twice: gpu0:9000" in err
