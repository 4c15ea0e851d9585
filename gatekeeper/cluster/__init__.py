"""Replicas: several gatekeepers share each Whisper server's limits through Redis.

`leases.py` is the mechanism: a crash-safe counting semaphore per Whisper server, its slots
leases on Redis's own clock (acquire, renew, release, and wake-ups when a slot frees). Which
task gets a slot stays with each replica's own gate and queue.
"""

__all__: list[str] = []
