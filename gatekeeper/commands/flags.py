"""The flags of the settings (shared by `serve` and `check-config`), loading them, error lines.

Each setting is a flag named after its field (`max_concurrent` → `--max-concurrent`) with its
environment variable and default in the help. Commands print bad input as `prog: problem` lines
on stderr and exit with `BAD_INPUT`.
"""

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any, Final

from pydantic.fields import FieldInfo

from gatekeeper.settings import ENV_PREFIX, Settings, SettingsError, load_settings

__all__ = [
    "BAD_INPUT",
    "add_settings_arguments",
    "flag_name",
    "print_error",
    "print_settings_error",
    "settings_loader",
]

BAD_INPUT: Final = 2
"""The exit status for bad settings, flags or input (argparse's own for a usage error)."""

# No default worth showing:
_UNSET: Final = ("oom_patterns", "stats_token", "spool_dir", "redis_url")


def flag_name(field: str) -> str:
    """The flag of a settings field without its dashes: `max_concurrent` → `max-concurrent`."""
    return field.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag VALUE` per setting, and `--env-file`."""
    for name, info in Settings.model_fields.items():
        parser.add_argument(
            f"--{flag_name(name)}", dest=name, metavar="VALUE", help=_help(name, info)
        )
    parser.add_argument(
        "--env-file",
        default=".env",
        metavar="PATH",
        help="Environment file to read settings from (default: .env in the working directory).",
    )


def _help(name: str, info: FieldInfo) -> str:
    text = (info.description or "").replace("%", "%%")
    if name == "upstream_url":
        return text
    return text + f" [{ENV_PREFIX}{name.upper()}, default: {_shown_default(name, info)}]"


def _shown_default(name: str, info: FieldInfo) -> object:
    if name == "gated_paths":
        return ",".join(info.default)
    if name in _UNSET:
        return "unset"
    return "derived" if info.default is None else info.default


def settings_loader(args: argparse.Namespace) -> Callable[[], Settings]:
    """Load the settings from the flags given in `args`, the environment and the env file;
    each call loads them again (a reload sees the new environment, the same flags)."""
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in Settings.model_fields}
    flags = {name: flag_name(name) for name, value in overrides.items() if value is not None}
    return functools.partial(load_settings, overrides, env_file=args.env_file, flags=flags)


def print_settings_error(exc: SettingsError) -> int:
    """Print each bad setting on its own line; return the exit status, `BAD_INPUT`."""
    for line in exc.lines:
        print(f"gatekeeper: {line}", file=sys.stderr)
    return BAD_INPUT


def print_error(prog: str, problem: object) -> int:
    """Print `prog: problem` on stderr; return the exit status, `BAD_INPUT`."""
    print(f"{prog}: {problem}", file=sys.stderr)
    return BAD_INPUT
