"""The external tools end-to-end tests drive, found or failed for loudly (never skipped)."""

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["ROOT", "require_tool", "run_promtool"]

ROOT = Path(__file__).parents[2]


def require_tool(command: str, package: str) -> str:
    """The path of `command`, or a test failure saying which Debian package to install."""
    path = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(
            f"{command} is not installed: run ./scripts/setup --test-tools, or install the "
            f"Debian package yourself (apt-get install -y {package}). These tests do not skip.",
            pytrace=False,
        )
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool from the repository root and capture what it says."""
    return subprocess.run(
        [promtool, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
