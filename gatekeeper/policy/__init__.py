"""Pure policy: the gatekeeper's decisions, with no asyncio, no aiohttp and no I/O.

Admission (start, queue or refuse; Retry-After), the retry schedule and the one "deliver or
retry" decision, what an upstream answer means, the outcome names, the adaptive limit, the worst
case of one task, and quantiles. Tested synchronously (tests/unit); the import-linter contract in
pyproject.toml keeps it free of the event loop.
"""
