# syntax=docker/dockerfile:1
# ASR Gatekeeper image: the built wheel installed into a clean venv on python:3.11-slim.
#
#   docker build -t asr-gatekeeper .
#   docker run --rm -p 8000:8000 -e ASR_UPSTREAM_URL=http://whisper:9000 asr-gatekeeper
#
# The install path (build the wheel, `python -m venv`, pip install the locked dependencies and
# the wheel, run `gatekeeper serve`) is the one tests/e2e/test_container.py runs for real, with
# ENTRYPOINT, CMD and HEALTHCHECK read from this file, because no Docker engine runs on the
# development machines.
# Settings come from the environment at run time (ASR_*, see deploy/.env.example); none are
# baked in. For fully reproducible builds pin the base by digest: python:3.11-slim@sha256:….

# --- build: turn the source into a wheel; nothing of this stage reaches the final image ---
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gatekeeper ./gatekeeper
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- run: the wheel and its dependencies in a venv, no compilers, no source tree ---
FROM python:3.11-slim
LABEL org.opencontainers.image.title="asr-gatekeeper" \
      org.opencontainers.image.description="Admission-controlled reverse proxy in front of a GPU Whisper server" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/gatekeeper/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The dependencies come from requirements/runtime.txt (./scripts/lock), each at the version
# and hash pinned there, so every build gets the versions CI tested; then the wheel, without
# dependencies, and `pip check` proves the lock covers them. The lock and the wheel are
# bind-mounted, so neither lands in a layer. Every dependency ships manylinux wheels for
# CPython 3.11, so nothing is compiled here.
RUN --mount=type=bind,source=requirements/runtime.txt,target=/requirements/runtime.txt \
    --mount=type=bind,from=build,source=/dist,target=/dist \
    python -m venv /opt/gatekeeper \
    && /opt/gatekeeper/bin/pip install --no-cache-dir --disable-pip-version-check \
        --require-hashes -r /requirements/runtime.txt \
    && /opt/gatekeeper/bin/pip install --no-cache-dir --disable-pip-version-check \
        --no-deps /dist/*.whl \
    && /opt/gatekeeper/bin/pip check --disable-pip-version-check \
    && useradd --system --no-log-init --user-group --uid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin gatekeeper \
    && mkdir -p /var/spool/gatekeeper \
    && chown gatekeeper:gatekeeper /var/spool/gatekeeper
# Request bodies above ASR_SPOOL_MEMORY_SIZE are spooled here (unlinked temporary files); a
# directory the user owns keeps this working with a read-only root filesystem and a volume.
ENV ASR_SPOOL_DIR=/var/spool/gatekeeper
WORKDIR /srv
# Numeric, so orchestrators (runAsNonRoot) can verify it is not root without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Healthy means the gatekeeper's own /health says 200: it serves and the Whisper server accepts
# connections (a server busy transcribing still counts as up). A 503 "degraded" (Whisper
# unreachable, or the gatekeeper draining after SIGTERM) marks the container unhealthy: every
# task would fail or be refused, and `docker ps` should say so. Docker does not restart
# unhealthy containers, and the compose file starts nginx without waiting for "healthy", so
# this reports the outage, it never causes one. Python itself does the request: no curl needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ASR_PORT', '8000'), timeout=4)\nexcept Exception as exc:\n    sys.exit('unhealthy: %s' % exc)"]
# Exec form: the gatekeeper is PID 1 and gets SIGTERM itself; it stops taking tasks, drains for
# ASR_SHUTDOWN_GRACE seconds (30 by default) and exits 0. Give it longer than that to stop
# (docker stop -t 45, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["gatekeeper"]
CMD ["serve"]
