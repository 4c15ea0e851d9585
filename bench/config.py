"""How much each scenario does, in the full run and in the quick (CI) run."""

from dataclasses import dataclass

__all__ = ["FULL", "QUICK", "BenchConfig"]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    # 1. overhead
    latency_requests: int
    """Requests per reference and round, timed one by one."""
    latency_concurrency: int
    latency_rounds: int
    warmup_requests: int
    rps_seconds: float
    rps_connections: int
    rps_rounds: int
    overhead_limit: int
    """ASR_MAX_CONCURRENT and HAProxy maxconn in the overhead scenario: above any concurrency."""
    # 2. uploads
    upload_mb: int
    upload_rounds: int
    queued_uploads: int
    queued_sizes_mb: tuple[int, ...]
    """Upload sizes for the queued-RSS check; flat means the peak does not follow the size."""
    # 3. overload
    burst_tasks: int
    burst_connections: int
    burst_limit: int
    burst_queue: int
    burst_rounds: int
    """Bursts per reference, in rotating rounds: one burst's p99 hangs on a few stalls."""
    # 4. GPU goodput
    time_scale: float
    sim_minutes: float
    arrival_rate_per_minute: float
    limits: tuple[int, ...]
    goodput_repeats: int
    """Replays of the schedule per setup; goodput is their mean, counts their sum."""
    cards: tuple[str, ...]
    """Simulated cards (`bench.scenarios.goodput.CARDS`), each with the full set of setups."""
    adaptive_starts: tuple[int, ...]
    """Where the adaptive gatekeeper starts (deliberately bad settings)."""
    adaptive_maximum: int
    """ASR_MAX_CONCURRENT of the adaptive gatekeeper: the bound it may never pass."""
    cooldown_off_cards: tuple[str, ...]
    """Cards that also get the gatekeeper at every fixed limit with ASR_OOM_COOLDOWN=0: the
    cost of admission and retries alone, without the seed's cool-down policy."""
    goodput_parallel: int
    """Replays run side by side (separate simulator and proxy processes; simulated time)."""
    # 5. a heterogeneous pool of cards
    pool_cards: tuple[str, ...]
    """The pool's cards (`bench.scenarios.goodput.CARDS`), one simulator each, in the order of
    ASR_UPSTREAM_URL and of HAProxy's servers."""
    pool_limits: tuple[int, ...]
    """Each card's fixed limit, in `pool_cards`' order: the card's best fixed limit in the
    single-card runs (section 4: the best goodput with at most 1 % of tasks failing)."""
    pool_adaptive_starts: tuple[int, ...]
    """Where the adaptive gatekeeper over the pool starts, on every card (bounds 1 to
    `adaptive_maximum` each)."""
    pool_cooldown_off: bool
    """Also the gatekeeper at the pool's limits with ASR_OOM_COOLDOWN=0 (and its single-card
    counterparts): the cost of the seed's cool-down, apart from admission and retries."""
    pool_repeats: int
    """Replays of each pool and single-card setup; goodput is their mean."""
    pool_parallel: int
    """Replays run side by side in the pool scenario (a pool replay is 3 simulators + a proxy)."""
    # 6. admission by GPU memory (#16)
    memory_time_scale: float
    """The simulator's speed-up in this scenario (its proxies' delays divided by it too): lower
    than section 4's, so that the milliseconds of every hand-over (a finished task's answer,
    the next start) weigh less against the simulated work, and the measured rows can be set
    beside a computed oracle."""
    memory_cards: tuple[str, ...]
    """Simulated cards (`bench.scenarios.goodput.CARDS`), each with every row of the scenario."""
    memory_cap: int
    """ASR_MAX_CONCURRENT of the gatekeeper admitting by memory: high, it only caps (the queue
    is 10 × it, for the measured memory rows and the oracle alike)."""
    memory_backfill_seconds: float
    """ASR_BACKFILL_SECONDS in simulated seconds (divided by the time scale when run)."""
    memory_seed_figures: tuple[float, float]
    """Where the learning gatekeeper starts: ASR_TASK_MEMORY_GIB, ASR_TASK_MEMORY_PER_MINUTE_GIB
    (the seed's 6 GiB a task whatever its length)."""
    memory_limits: tuple[int, ...]
    """Fixed limits of the HAProxy and gatekeeper-by-count rows."""
    memory_adaptive_start: int
    """Where today's adaptive count starts (bounds 1 to `adaptive_maximum`)."""
    memory_wav_rate: int
    """Sample rate of the WAV files uploaded (16-bit mono silence): low keeps them small."""
    memory_repeats: int
    """Replays of each measured row; goodput is their mean, waits pooled."""
    memory_parallel: int
    """Replays run side by side (each with its own simulator and proxy)."""


FULL = BenchConfig(
    name="full",
    latency_requests=1500,
    latency_concurrency=1,
    latency_rounds=3,
    warmup_requests=300,
    rps_seconds=8.0,
    rps_connections=32,
    rps_rounds=3,
    overhead_limit=64,
    upload_mb=100,
    upload_rounds=3,
    queued_uploads=20,
    queued_sizes_mb=(10, 100),
    burst_tasks=5000,
    burst_connections=50,
    burst_limit=2,
    burst_queue=20,
    burst_rounds=3,
    time_scale=120.0,
    sim_minutes=60.0,
    arrival_rate_per_minute=10.0,
    limits=(1, 2, 3, 4),
    goodput_repeats=2,
    cards=("default", "half"),
    adaptive_starts=(1, 8),
    adaptive_maximum=8,
    cooldown_off_cards=("default",),
    goodput_parallel=4,
    pool_cards=("default", "default", "half"),
    pool_limits=(2, 2, 1),
    pool_adaptive_starts=(1,),
    pool_cooldown_off=True,
    pool_repeats=3,
    pool_parallel=2,
    memory_time_scale=60.0,
    memory_cards=("default", "half"),
    memory_cap=12,
    memory_backfill_seconds=120.0,
    memory_seed_figures=(6.0, 0.0),
    memory_limits=(1, 2, 3, 4),
    memory_adaptive_start=1,
    memory_wav_rate=1000,
    memory_repeats=2,
    memory_parallel=4,
)

QUICK = BenchConfig(
    name="quick",
    latency_requests=300,
    latency_concurrency=1,
    latency_rounds=1,
    warmup_requests=100,
    rps_seconds=2.0,
    rps_connections=32,
    rps_rounds=1,
    overhead_limit=64,
    upload_mb=20,
    upload_rounds=1,
    queued_uploads=20,
    queued_sizes_mb=(2, 5),
    burst_tasks=1000,
    burst_connections=50,
    burst_limit=2,
    burst_queue=20,
    burst_rounds=1,
    time_scale=600.0,
    sim_minutes=10.0,
    arrival_rate_per_minute=10.0,
    limits=(2,),
    goodput_repeats=1,
    cards=("default",),
    adaptive_starts=(8,),
    adaptive_maximum=8,
    cooldown_off_cards=(),
    goodput_parallel=2,
    pool_cards=("default", "default", "half"),
    pool_limits=(2, 2, 1),
    pool_adaptive_starts=(1,),
    pool_cooldown_off=False,
    pool_repeats=1,
    pool_parallel=3,
    memory_time_scale=600.0,
    memory_cards=("default",),
    memory_cap=12,
    memory_backfill_seconds=120.0,
    memory_seed_figures=(6.0, 0.0),
    memory_limits=(2,),
    memory_adaptive_start=1,
    memory_wav_rate=1000,
    memory_repeats=1,
    memory_parallel=4,
)
