"""The dependency locks in requirements/ against pyproject.toml, requirements/whisper.in and the
scripts that install them.

./scripts/lock makes the locks (uv, universal, hashed); ./scripts/setup, the Dockerfile and
scripts/setup-whisper install them with plain `pip install --require-hashes`. These checks read
files only, so they need no network: a dependency added to pyproject.toml without rerunning
./scripts/lock, or a range moved past the locked version, fails here, not on a fresh machine.
"""

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = ROOT / "pyproject.toml"
RUNTIME_LOCK = REQUIREMENTS / "runtime.txt"
TEST_LOCK = REQUIREMENTS / "test.txt"
WHISPER_IN = REQUIREMENTS / "whisper.in"
WHISPER_LOCK = REQUIREMENTS / "whisper.txt"
REFRESH = "run ./scripts/lock, then ./scripts/setup"
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: tuple[str, ...]
    requirement: Requirement


def parse_lock(text: str, what: str, problems: list[str]) -> dict[str, Pin]:
    """The pins of a requirements file, by canonical name; lines pip's --require-hashes mode
    would refuse (no `==`, no sha256 hash, a name twice) go to `problems` instead."""
    pins: dict[str, Pin] = {}
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        hashes = tuple(w.removeprefix("--hash=") for w in words if w.startswith("--hash="))
        requirement = Requirement(" ".join(w for w in words if not w.startswith("--hash=")))
        name = canonicalize_name(requirement.name)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            problems.append(f"{what}: {requirement} is not pinned with ==")
            continue
        if not hashes or not all(SHA256.fullmatch(h) for h in hashes):
            problems.append(f"{what}: {name} has no sha256 hash")
        if name in pins:
            problems.append(f"{what}: {name} is pinned twice")
        pins[name] = Pin(specifiers[0].version, hashes, requirement)
    return pins


def check_against(
    wanted: list[str], where: str, locks: dict[str, Pin], what: str, problems: list[str]
) -> None:
    """Each requirement of `wanted` (from `where`) must be in `locks`, at a version it allows."""
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        pin = locks.get(name)
        if pin is None:
            problems.append(f"{where} names {requirement.name}, {what} lacks it")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(
                f"{what} pins {name}=={pin.version}, outside "
                f"{requirement.name}{requirement.specifier} ({where})"
            )


def lock_problems(pyproject: str, runtime_lock: str, test_lock: str) -> list[str]:
    """Where pyproject.toml's text and the two locks' texts disagree (empty when they agree)."""
    project = tomllib.loads(pyproject)["project"]
    problems: list[str] = []
    runtime = parse_lock(runtime_lock, "requirements/runtime.txt", problems)
    tools = parse_lock(test_lock, "requirements/test.txt", problems)
    # ./scripts/setup installs both locks in one pip run: a name in both could disagree.
    problems += [f"{name} is in both runtime.txt and test.txt" for name in runtime.keys() & tools]
    check_against(
        project["dependencies"],
        "pyproject.toml's dependencies",
        runtime,
        "requirements/runtime.txt",
        problems,
    )
    # test.txt leaves out what runtime.txt already pins, so a test tool may be pinned there.
    check_against(
        project["optional-dependencies"]["test"],
        "pyproject.toml's test extra",
        {**runtime, **tools},
        "requirements/test.txt (with runtime.txt)",
        problems,
    )
    return problems


def whisper_problems(whisper_in: str, whisper_lock: str) -> list[str]:
    """Where requirements/whisper.in's text and its lock's text disagree (empty when they agree)."""
    problems: list[str] = []
    pins = parse_lock(whisper_lock, "requirements/whisper.txt", problems)
    lines = (line.partition("#")[0].strip() for line in whisper_in.splitlines())
    wanted = [line for line in lines if line]
    check_against(wanted, "requirements/whisper.in", pins, "requirements/whisper.txt", problems)
    return problems


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_locks_agree_with_pyproject() -> None:
    """Every dependency and test tool of pyproject.toml is locked, hashed, within its range."""
    problems = lock_problems(read(PYPROJECT), read(RUNTIME_LOCK), read(TEST_LOCK))
    assert not problems, f"{REFRESH}:\n" + "\n".join(problems)


def test_whisper_lock_agrees_with_whisper_in() -> None:
    """Every package requirements/whisper.in names is in requirements/whisper.txt, hashed."""
    problems = whisper_problems(read(WHISPER_IN), read(WHISPER_LOCK))
    assert not problems, f"{REFRESH}:\n" + "\n".join(problems)


# (which file, a regular expression, its replacement, what the report must say)
DOCTORINGS = {
    "dependency-not-locked": (
        PYPROJECT,
        r"dependencies = \[\n",
        'dependencies = [\n    "requests>=2",\n',
        "pyproject.toml's dependencies names requests, requirements/runtime.txt lacks it",
    ),
    "locked-version-outside-range": (
        PYPROJECT,
        r'"aiohttp>=3\.10,<4"',
        '"aiohttp>=99"',
        "outside aiohttp>=99 (pyproject.toml's dependencies)",
    ),
    "test-tool-not-locked": (
        PYPROJECT,
        r"test = \[\n",
        'test = [\n    "pytest-timeout>=2",\n',
        "pyproject.toml's test extra names pytest-timeout",
    ),
    "test-tool-outside-range": (
        PYPROJECT,
        r'"ruff>=0\.5"',
        '"ruff<0.1"',
        "outside ruff<0.1 (pyproject.toml's test extra)",
    ),
    "unpinned-line": (
        RUNTIME_LOCK,
        r"(?m)^aiohttp==",
        "aiohttp>=",
        "requirements/runtime.txt: aiohttp>=",
    ),
    "unhashed-line": (
        RUNTIME_LOCK,
        r"(?m)^(yarl==\S+)( \\\n\s+--hash=\S+)+",
        r"\1",
        "requirements/runtime.txt: yarl has no sha256 hash",
    ),
    "pinned-in-both-locks": (
        TEST_LOCK,
        r"\Z",
        "yarl==1.0 --hash=sha256:" + "0" * 64 + "\n",
        "yarl is in both runtime.txt and test.txt",
    ),
}


def doctored(path: Path, pattern: str, replacement: str) -> str:
    text, count = re.subn(pattern, replacement, read(path), count=1)
    assert count == 1, f"the doctoring no longer applies: {pattern!r} not in {path.name}"
    return text


@pytest.mark.parametrize("case", DOCTORINGS)
def test_a_doctored_pyproject_or_lock_is_caught(case: str) -> None:
    """Each way pyproject.toml and the locks can drift apart is reported, by name."""
    path, pattern, replacement, expected = DOCTORINGS[case]
    texts = {p: read(p) for p in (PYPROJECT, RUNTIME_LOCK, TEST_LOCK)}
    texts[path] = doctored(path, pattern, replacement)
    problems = lock_problems(texts[PYPROJECT], texts[RUNTIME_LOCK], texts[TEST_LOCK])
    assert any(expected in problem for problem in problems), problems


def test_a_doctored_whisper_lock_is_caught() -> None:
    """A whisper.in package missing from whisper.txt, or at another version, is reported."""
    lock = read(WHISPER_LOCK)
    missing = whisper_problems(read(WHISPER_IN) + "tqdm-extra==1.0\n", lock)
    assert any("names tqdm-extra" in problem for problem in missing), missing
    moved = whisper_problems(doctored(WHISPER_IN, r"ctranslate2==\S+", "ctranslate2==9.9"), lock)
    assert any("ctranslate2==4" in p and "outside" in p for p in moved), moved


def test_this_environment_has_the_locked_versions() -> None:
    """The interpreter running the tests has each package of both locks at its locked version."""
    problems: list[str] = []
    pins = {
        **parse_lock(read(RUNTIME_LOCK), "runtime.txt", problems),
        **parse_lock(read(TEST_LOCK), "test.txt", problems),
    }
    for name, pin in pins.items():
        marker = pin.requirement.marker
        if marker is not None and not marker.evaluate():
            continue  # not for this platform
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (locked: {pin.version})")
            continue
        if installed != pin.version:
            problems.append(f"{name} {installed} is installed, the lock says {pin.version}")
    assert not problems, "run ./scripts/setup:\n" + "\n".join(problems)


def test_the_setup_scripts_install_the_locks_with_hashes() -> None:
    """./scripts/setup and scripts/setup-whisper install their locks in pip's hash-checking mode."""
    setup = read(ROOT / "scripts" / "setup")
    assert "--require-hashes" in setup
    assert "-r requirements/runtime.txt -r requirements/test.txt" in setup
    whisper = read(ROOT / "scripts" / "setup-whisper")
    assert "--require-hashes" in whisper
    assert "LOCK=requirements/whisper.txt" in whisper
