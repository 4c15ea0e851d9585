"""Live reconfiguration: the current settings, and the one way to change them while serving.

`PATCH /admin/config` and SIGHUP (re-read the environment file) both end in
`Controller.apply`, with the same validation as start-up. Lowering the limit never stops running
tasks — new ones wait until active drops below it; raising it starts queued tasks at once.
"""

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gatekeeper.logs import Event, log_event
from gatekeeper.settings import LIVE_SETTINGS, Settings, SettingsError, validate_settings

__all__ = ["RELOADABLE", "ConfigChange", "Controller"]

# What may change without a restart: said on the settings themselves (settings.py, `_LIVE`).
RELOADABLE = LIVE_SETTINGS


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One setting's effective value before and after a change."""

    name: str
    old: Any
    new: Any


class Controller:
    """Holds the current settings; applies validated changes through `on_change`."""

    def __init__(self, settings: Settings, on_change: Callable[[Settings], None]) -> None:
        self.settings = settings
        self._on_change = on_change

    def apply(self, patch: Mapping[str, Any], *, who: str, via: str) -> list[ConfigChange]:
        """Validate `patch` against the current settings and apply it; raise SettingsError.

        Values the operator never set explicitly keep following their base: raising
        max_concurrent from 2 to 3 moves a default max_queue from 20 to 30. A `null` value
        returns a setting to its default (for max_queue: following the limit again).
        """
        problems = []
        for name in patch:
            if name not in Settings.model_fields:
                problems.append(f"{name} is not a setting")
            elif name not in RELOADABLE:
                problems.append(f"{name} cannot change while running: restart the gatekeeper")
        if problems:
            raise SettingsError(problems)
        current = self.settings
        data = {name: getattr(current, name) for name in current.model_fields_set}
        for name, value in patch.items():
            if value is None:
                data.pop(name, None)  # back to the default, derived again from its base
            else:
                data[name] = value
        return self._replace(validate_settings(data), who=who, via=via)

    def reload(self, fresh: Settings, *, via: str) -> list[ConfigChange]:
        """Take the reloadable settings from freshly loaded ones; warn about the rest.

        A reloadable setting removed from the file goes back to its default.
        """
        current = self.settings
        before, after = current.public_dict(), fresh.public_dict()
        ignored = sorted(
            name
            for name in Settings.model_fields
            if name not in RELOADABLE and before.get(name) != after.get(name)
        )
        if (current.stats_token, current.admin_token) != (fresh.stats_token, fresh.admin_token):
            ignored.append("tokens")
        if ignored:
            log_event(
                Event.CONFIG_NEEDS_RESTART, logging.WARNING, settings=",".join(ignored), via=via
            )
        data = {n: getattr(fresh, n) for n in fresh.model_fields_set if n in RELOADABLE}
        data.update(
            {n: getattr(current, n) for n in current.model_fields_set if n not in RELOADABLE}
        )
        return self._replace(validate_settings(data), who="local", via=via)

    def _replace(self, updated: Settings, *, who: str, via: str) -> list[ConfigChange]:
        before, after = self.settings.public_dict(), updated.public_dict()
        changes = [
            ConfigChange(name, before[name], after[name])
            for name in sorted(RELOADABLE)
            if before.get(name) != after.get(name)
        ]
        if not changes:
            return []
        self.settings = updated
        self._on_change(updated)
        for change in changes:
            log_event(
                Event.CONFIG_CHANGED,
                logging.WARNING,
                setting=change.name,
                old=change.old,
                new=change.new,
                by=who,
                via=via,
            )
        return changes
