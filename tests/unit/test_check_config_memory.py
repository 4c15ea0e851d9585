"""`gatekeeper check-config` with admission by memory and timeouts scaled by the audio (#16):
each card's budget and figures and what they mean in tasks at once, the warnings, the backfill
bound, the adaptive mode's part; and the worst case, which stays the same (ASR_QUEUE_TIMEOUT
still bounds a queue wait, ASR_REQUEST_TIMEOUT still bounds an attempt)."""

import argparse
import os

import pytest

from gatekeeper.commands.check_config import add_check_config_arguments, run_check_config

ONE = "http://whisper:9000"
POOL = "http://gpu0:9000,http://gpu1:9000"
SIM_CARD = (
    "--gpu-memory-gib",
    "18",
    "--task-memory-gib",
    "2",
    "--task-memory-per-minute-gib",
    "0.8",
)


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_check_config_arguments(parser)
    status = run_check_config(parser.parse_args(["--env-file", os.devnull, *argv]))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _worst_case(out: str) -> list[str]:
    """From the worst case's heading to the end: what a proxy timeout is checked against."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Worst case"))
    return lines[start:]


def _memory_block(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Admission by GPU memory"))
    end = next(i for i, line in enumerate(lines) if line.startswith("Worst case"))
    return lines[start:end]


def test_by_count_there_is_no_memory_section(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _check(capsys, "--upstream-url", ONE, "--max-concurrent", "3")
    assert (status, err) == (0, "")
    assert "memory" not in out.lower()
    assert "Attempt timeout" not in out


def test_each_card_its_budget_figures_and_tasks_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The simulator's card (18 GiB, 2 + 0.8 GiB per minute) with a cap of 6: 1-minute files 6
    at once, 5-minute 3, 10-minute 1; a 30-minute file (26 GiB) runs alone. No warning."""
    status, out, err = _check(
        capsys, "--upstream-url", ONE, "--max-concurrent", "6", *SIM_CARD, "--proxy-timeout", "5000"
    )
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[1].endswith(
        "http://whisper:9000  at most 6 at a time, as its memory allows (below)"
    )
    block = _memory_block(out)
    assert block[0].endswith("ASR_MAX_CONCURRENT still caps the count:")
    assert block[1].startswith("  whisper:9000  18 GiB for tasks; a task 2 GiB + 0.8 GiB per audio")
    assert block[2].strip() == (
        "at once: 1 min 6, 5 min 3, 10 min 1, 30 min 1 (alone: 26 GiB > 18 GiB)"
    )
    assert "costed as 60 min of audio (50 GiB on whisper:9000)" in block[3]
    assert "NOTE" not in out


def test_a_count_cap_that_holds_short_files_back_gets_a_note(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a cap of 3, 1-minute files run 3 at once where memory fits 6: memory adds little
    for short files; raise ASR_MAX_CONCURRENT."""
    status, out, err = _check(capsys, "--upstream-url", ONE, "--max-concurrent", "3", *SIM_CARD)
    assert (status, err) == (0, "")
    assert "at once: 1 min 3 (the count cap; memory fits 6), 5 min 3, 10 min 1" in out
    [note] = [line for line in out.splitlines() if line.startswith("NOTE")]
    assert "ASR_MAX_CONCURRENT=3 is what limits 1-minute files" in note
    assert "admission by memory adds little for short files" in note
    assert "raise ASR_MAX_CONCURRENT (to 6 for 1-minute files)" in note


def test_a_ten_minute_file_bigger_than_the_card_is_warned_about(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a 9 GiB card a 10-minute file (10 GiB) runs alone: a warning on stderr; the exit
    status is still about the proxy only."""
    status, out, err = _check(
        capsys,
        *("--upstream-url", ONE, "--max-concurrent", "4", "--gpu-memory-gib", "9"),
        *("--task-memory-gib", "2", "--task-memory-per-minute-gib", "0.8"),
        *("--proxy-timeout", "5000"),
    )
    assert status == 0
    assert "10 min 1 (alone: 10 GiB > 9 GiB)" in out
    [warning] = err.splitlines()
    assert warning.startswith("WARNING: whisper:9000: a 10-minute file alone is estimated at 10")
    assert "more than the card's 9 GiB: such files run alone" in warning
    assert "gatekeeper tune --durations 60,300" in warning


def test_backfill_bound_and_the_long_files_worst_wait(capsys: pytest.CaptureFixture[str]) -> None:
    """The head of the queue is passed for at most ASR_BACKFILL_SECONDS; a long file's queue
    wait is still bounded by ASR_QUEUE_TIMEOUT, so the worst case is the same as by count."""
    common = ("--upstream-url", ONE, "--max-concurrent", "6", "--queue-timeout", "900")
    _, by_count, _ = _check(capsys, *common)
    _, out, _ = _check(capsys, *common, *SIM_CARD, "--backfill-seconds", "45")
    [line] = [line for line in out.splitlines() if line.strip().startswith("backfill:")]
    assert "passed for at most ASR_BACKFILL_SECONDS=45 s; then it is served next" in line
    assert "still bounded by ASR_QUEUE_TIMEOUT=900 s" in line
    assert "the worst case below is unchanged" in line
    assert _worst_case(out) == _worst_case(by_count)

    _, fifo, _ = _check(capsys, *common, *SIM_CARD, "--backfill-seconds", "0")
    assert "ASR_BACKFILL_SECONDS=0: strictly first-in first-out" in fifo
    assert "backfill:" not in fifo


def test_adaptive_by_memory_learns_the_figures_and_keeps_the_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ASR_ADAPTIVE with memory: the count is a cap that does not adapt (no "starts at"); the
    figures are learned starting from the settings."""
    status, out, _ = _check(
        capsys, "--upstream-url", ONE, "--max-concurrent", "6", "--adaptive", "true", *SIM_CARD
    )
    assert status == 0
    assert "adaptive; starts at" not in out
    assert "at most 6 at a time, as its memory allows" in out
    [line] = [line for line in out.splitlines() if "ASR_ADAPTIVE=true by memory" in line]
    assert "the count does not adapt (ASR_MAX_CONCURRENT only caps)" in line
    assert "learned from its OOMs and successes, starting from the settings above" in line


def test_a_pool_shows_each_cards_own_budget_and_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Per card: 18 GiB with 2 + 0.8 and 9 GiB with 3 + 1; one warning, for the small card."""
    status, out, err = _check(
        capsys,
        *("--upstream-url", POOL, "--max-concurrent", "6,2"),
        *("--gpu-memory-gib", "18,9", "--task-memory-gib", "2,3"),
        *("--task-memory-per-minute-gib", "0.8,1"),
    )
    assert status == 0
    block = _memory_block(out)
    assert block[1].startswith("  gpu0:9000  18 GiB for tasks; a task 2 GiB + 0.8 GiB")
    assert (
        block[2].strip() == "at once: 1 min 6, 5 min 3, 10 min 1, 30 min 1 (alone: 26 GiB > 18 GiB)"
    )
    assert block[3].startswith("  gpu1:9000  9 GiB for tasks; a task 3 GiB + 1 GiB")
    assert block[4].strip() == (
        "at once: 1 min 2, 5 min 1, 10 min 1 (alone: 13 GiB > 9 GiB), "
        "30 min 1 (alone: 33 GiB > 9 GiB)"
    )
    assert "50 GiB on gpu0:9000, 63 GiB on gpu1:9000" in out
    assert [line.split(":")[1].strip() for line in err.splitlines()] == ["gpu1"]


def test_timeouts_scaled_by_the_audio_leave_the_worst_case_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ASR_TIMEOUT_PER_AUDIO_MINUTE=30 with ASR_REQUEST_TIMEOUT=600: 1 min 60 s, 5 min 150 s,
    10 min 300 s, unknown 600 s. The worst case still counts every attempt at 600 s (the cap,
    and what files of unknown length get): the same lines as without it."""
    common = ("--upstream-url", ONE, "--request-timeout", "600")
    _, plain, _ = _check(capsys, *common)
    status, out, _ = _check(capsys, *common, "--timeout-per-audio-minute", "30")
    assert status == 0
    [line] = [line for line in out.splitlines() if line.startswith("Attempt timeout")]
    assert "1 min 60 s, 5 min 150 s, 10 min 300 s" in line
    assert "a file whose length cannot be read gets 600 s" in line
    assert "counts every attempt at ASR_REQUEST_TIMEOUT=600 s" in line
    assert _worst_case(out) == _worst_case(plain)
    assert "4 attempt(s) × 600 s" in out

    # A lower cap: the 10-minute file gets ASR_REQUEST_TIMEOUT, not 300 s.
    _, capped, _ = _check(
        capsys,
        "--upstream-url",
        ONE,
        "--request-timeout",
        "200",
        "--timeout-per-audio-minute",
        "30",
    )
    assert "1 min 60 s, 5 min 150 s, 10 min 200 s" in capped


@pytest.mark.parametrize("proxy", ["3000", "1000"])
def test_the_proxy_verdict_is_the_same_by_memory(
    capsys: pytest.CaptureFixture[str], proxy: str
) -> None:
    """Memory admission changes no worst case, so no proxy verdict."""
    common = ("--upstream-url", ONE, "--proxy-timeout", proxy)
    by_count, _, _ = _check(capsys, *common)
    by_memory, _, _ = _check(
        capsys, *common, *SIM_CARD, "--timeout-per-audio-minute", "30", "--adaptive", "true"
    )
    adaptive, _, _ = _check(capsys, *common, "--adaptive", "true")
    assert by_memory == adaptive
    assert by_count == (0 if proxy == "3000" else 1)
