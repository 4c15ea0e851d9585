"""The worst case of one task (what a proxy timeout must exceed), checked against hand arithmetic.

The seed's schemes (SPEC defaults otherwise: queue timeout 600 s, request timeout 300 s,
jitter 0.1, OOM cool-down 1.5 × delay). The longest retry delay is the OOM/crash schedule
d·3^(k−1) with jitter at its top (×1.1); an upstream Retry-After raises a delay to at most 300 s.
"""

from dataclasses import FrozenInstanceError

import pytest

from gatekeeper.commands.check_config import suggested_timeout
from gatekeeper.commands.nginx_conf import (
    ProxiedLocation,
    nginx_proxied_locations,
    parse_nginx_size,
    parse_nginx_time,
)
from gatekeeper.policy.budget import TaskBudget, from_settings, task_budget
from gatekeeper.settings import load_settings

# name, (retries, delay, cool-down), longest delays, delays with Retry-After, totals without/with
SCHEMES = [
    # Defaults and scheme A (1 at a time) and B (2 at a time): concurrency does not change the
    # worst case of one task; the queue timeout bounds its wait whatever the queue length.
    # 600 + 15 + 4 × 300 + (11 + 33 + 99) = 1958; with Retry-After 600 + 15 + 1200 + 3 × 300.
    # (With a cool-down a task keeps its slot through its delays: no slot waits.)
    pytest.param(3, 10, 15.0, (11, 33, 99), (300, 300, 300), 1958, 2715, id="defaults-A-B"),
    # The adaptive mode's default (no cool-down): the slot is given away during each delay, and
    # each retry may wait up to one request timeout for one: 600 + 1200 + 143 + 900 = 2843.
    pytest.param(3, 10, 0.0, (11, 33, 99), (300, 300, 300), 2843, 3600, id="no-cool-down-adaptive"),
    # Scheme C: 5 retries, delay 15. Delays 15·3^(k−1)·1.1 = 16.5, 49.5, 148.5, 445.5, 1336.5;
    # 600 + 22.5 + 6 × 300 + 1996.5 = 4419; Retry-After lifts only the first three to 300.
    pytest.param(
        5,
        15,
        22.5,
        (16.5, 49.5, 148.5, 445.5, 1336.5),
        (300, 300, 300, 445.5, 1336.5),
        4419,
        5104.5,
        id="C",
    ),
    # No retries: one attempt after the queue and the cool-down, nothing to delay.
    pytest.param(0, 10, 15.0, (), (), 915, 915, id="no-retries"),
    # A zero base delay leaves only what an upstream Retry-After can impose.
    pytest.param(2, 0, 0.0, (0, 0), (300, 300), 2100, 2700, id="zero-delay"),
]


@pytest.mark.parametrize(
    ("retries", "delay", "cooldown", "delays", "capped", "worst", "upper"), SCHEMES
)
def test_worst_case_of_the_seed_schemes(
    retries: int,
    delay: float,
    cooldown: float,
    delays: tuple[float, ...],
    capped: tuple[float, ...],
    worst: float,
    upper: float,
) -> None:
    """Queue timeout + cool-down + every attempt + the longest retry delays + a slot wait per
    retry add up by hand."""
    budget = task_budget(
        queue_timeout=600,
        request_timeout=300,
        max_retries=retries,
        retry_delay=delay,
        retry_jitter=0.1,
        oom_cooldown=cooldown,
    )
    assert budget.attempts == retries + 1
    assert budget.attempts_seconds == (retries + 1) * 300
    assert budget.retry_slot_wait_seconds == (0 if cooldown else retries * 300)
    assert budget.retry_delays == pytest.approx(delays)
    assert budget.retry_delays_with_retry_after == pytest.approx(capped)
    assert budget.worst_case == pytest.approx(worst)
    assert budget.worst_case_with_retry_after == pytest.approx(upper)


def test_settings_give_the_same_budget() -> None:
    """`from_settings` reads the derived defaults (cool-down 1.5 × delay) like the gatekeeper."""
    settings = load_settings(
        {"upstream_url": "http://whisper:9000", "max_retries": 5, "retry_delay": 15},
        env_file=None,
    )
    budget = from_settings(settings)
    assert budget.oom_cooldown == 22.5
    assert budget.worst_case_with_retry_after == pytest.approx(5104.5)


def test_jitter_zero_gives_the_bare_schedule() -> None:
    """Without jitter the delays are exactly d·3^(k−1)."""
    budget = task_budget(
        queue_timeout=2,
        request_timeout=1.5,
        max_retries=2,
        retry_delay=1,
        retry_jitter=0,
        oom_cooldown=1.5,
    )
    assert budget.retry_delays == (1.0, 3.0)
    assert budget.worst_case == pytest.approx(2 + 1.5 + 3 * 1.5 + 4)


@pytest.mark.parametrize(
    ("proxy", "retry_after", "covered"),
    [
        (3000, True, True),
        (2715, True, False),  # equal is not enough: the proxy would give up at the same moment
        (2000, True, False),
        (2000, False, True),
        (1958, False, False),
    ],
)
def test_a_proxy_timeout_covers_the_worst_case_only_beyond_it(
    proxy: float, retry_after: bool, covered: bool
) -> None:
    """A proxy timeout is enough only when it is longer than the worst case it is held to."""
    budget = task_budget(
        queue_timeout=600,
        request_timeout=300,
        max_retries=3,
        retry_delay=10,
        retry_jitter=0.1,
        oom_cooldown=15,
    )
    assert budget.covered_by(proxy, upstream_retry_after=retry_after) is covered


@pytest.mark.parametrize("retry_on_timeout", [False, True])
def test_a_retried_timeout_waits_out_its_hold(retry_on_timeout: bool) -> None:
    """With ASR_RETRY_ON_TIMEOUT each retry may first wait ASR_TIMEOUT_HOLD for the Whisper
    server to finish the timed-out attempt; without it the 504 goes out at the deadline."""
    common = {
        "queue_timeout": 600,
        "request_timeout": 300,
        "max_retries": 3,
        "retry_delay": 10,
        "retry_jitter": 0.1,
        "oom_cooldown": 15,
    }
    held = task_budget(**common, retry_on_timeout=retry_on_timeout, timeout_hold=400)
    plain = task_budget(**common)
    assert held.retry_hold_seconds == (3 * 400 if retry_on_timeout else 0)
    assert held.worst_case == pytest.approx(plain.worst_case + held.retry_hold_seconds)
    settings = load_settings(
        {
            "upstream_url": "http://w:9000",
            "retry_on_timeout": retry_on_timeout,
            "timeout_hold": 400,
        },
        env_file=None,
    )
    assert from_settings(settings) == held


def test_budget_is_a_frozen_value() -> None:
    """The result is an immutable value that can be logged and compared."""
    budget = task_budget(
        queue_timeout=1,
        request_timeout=1,
        max_retries=0,
        retry_delay=0,
        retry_jitter=0,
        oom_cooldown=0,
    )
    assert isinstance(budget, TaskBudget)
    with pytest.raises(FrozenInstanceError):
        budget.queue_timeout = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60", 60),
        ("3000s", 3000),
        ("50m", 3000),
        ("1h 30m", 5400),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("2d", 172800),
    ],
)
def test_nginx_times(text: str, seconds: float) -> None:
    """nginx time values read as nginx reads them."""
    assert parse_nginx_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10 parsecs", "-5s", "1.5h"])
def test_bad_nginx_times_are_refused(text: str) -> None:
    """Anything nginx would not accept as a time is an error, not a guess."""
    with pytest.raises(ValueError, match="not an nginx time"):
        parse_nginx_time(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1g", 1073741824), ("512M", 536870912), ("64k", 65536), ("1048576", 1048576), ("0", 0)],
)
def test_nginx_sizes(text: str, size: int) -> None:
    """nginx size values use powers of 1024, like ASR_MAX_BODY_SIZE's bytes."""
    assert parse_nginx_size(text) == size


@pytest.mark.parametrize(
    ("worst", "suggested"),
    [(3600, 4000), (2715, 3000), (5104.5, 5700), (1958, 2200), (12, 14)],
)
def test_suggested_timeouts_leave_room(worst: float, suggested: int) -> None:
    """The suggested proxy timeout is the worst case plus 10 %, rounded up."""
    assert suggested_timeout(worst) == suggested


_NGINX = """
upstream gatekeeper_upstream { server gatekeeper:8000; keepalive 16; }
server {
    listen 80;  # a comment with { braces } and ; is ignored
    proxy_read_timeout "1h 30m";
    client_max_body_size 1g;
    location / {
        proxy_send_timeout 5m;
        proxy_pass http://gatekeeper_upstream;
    }
    location /docs { proxy_pass http://docs:8080; }
    location /static { root /srv; }
}
"""


def test_nginx_locations_inherit_timeouts_from_the_server() -> None:
    """A location proxying to the gatekeeper has its own values, else the server's, else nginx's."""
    assert nginx_proxied_locations(_NGINX) == [
        ProxiedLocation(
            location="/",
            proxy_pass="http://gatekeeper_upstream",
            line=7,
            read_timeout=5400,
            send_timeout=300,
            client_max_body_size=1073741824,
        )
    ]


def test_nginx_defaults_apply_when_nothing_is_set() -> None:
    """Without the gatekeeper's upstream name every proxying location counts, at nginx's 60 s."""
    text = "server { location / { proxy_pass http://10.0.0.5:8000; } }"
    [location] = nginx_proxied_locations(text)
    assert (location.read_timeout, location.send_timeout) == (60, 60)
    assert location.client_max_body_size == 1024 * 1024


@pytest.mark.parametrize("text", ["server { location / { proxy_pass x; }", "}", "a b"])
def test_broken_nginx_configs_are_refused(text: str) -> None:
    """An unbalanced or unterminated config is an error, not an empty result."""
    with pytest.raises(ValueError, match=r"line|end of file"):
        nginx_proxied_locations(text)
