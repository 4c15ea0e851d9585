"""The gatekeeper's benchmark harness: ``python -m bench`` (``--help`` for the options).

It starts every process on free loopback ports — a fast upstream, the Whisper simulator,
HAProxy, nginx and the gatekeeper — drives them with the same client side by side, and writes
``RESULTS.md`` and ``results.json``. Figures that matter are ratios between references measured
in the same run; absolute times on a shared 2-core machine are noise.

Modules: `cli` (options, orchestration), `scenarios` (the four measurements), `procs` (starting
and stopping processes, peak RSS), `httpclient` (a minimal keep-alive HTTP/1.1 client, so the
client's own cost stays small), `upstream` (the fast upstream process), `probe` (the process
that times /metrics and /health during a flood), `workload` (the seeded GPU arrival schedule),
`report` (machine description, targets, Markdown and JSON), `profile` (py-spy summaries).
"""
