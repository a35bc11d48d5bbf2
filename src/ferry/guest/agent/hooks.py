"""The ``[agent]`` table of a blueprint: whether the image carries the agent, and its hooks.

::

    [agent]
    enabled = true                        # default; false builds a guest without the agent
    before_suspend = ["redis-cli save"]   # run in order by `sh -c` before a snapshot
    after_resume = ["/etc/init.d/ntp restart"]  # run after the clock is set on resume

The hooks reach the guest as ``/ferry/agent/hooks.conf``, one
``<phase> <command>`` line per hook, which the agent rereads on every request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ferry.errors import ConfigError

HOOKS_PATH = "/ferry/agent/hooks.conf"
AGENT_PATH = "/ferry/agent/agent"
MAX_HOOKS_PER_PHASE = 32  # the agent reports at most 64 per request
_KEYS = {"enabled", "before_suspend", "after_resume"}


def _commands(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"agent.{key} must be a list of strings")
    if len(value) > MAX_HOOKS_PER_PHASE:
        raise ConfigError(f"agent.{key}: at most {MAX_HOOKS_PER_PHASE} hooks")
    for cmd in value:
        if not cmd.strip() or "\n" in cmd or "\r" in cmd or "\0" in cmd:
            raise ConfigError(f"agent.{key}: {cmd!r} must be one non-empty line")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """Validated ``[agent]`` settings of a blueprint."""

    enabled: bool = True
    before_suspend: tuple[str, ...] = ()
    after_resume: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _commands(list(self.before_suspend), "before_suspend")
        _commands(list(self.after_resume), "after_resume")
        if not self.enabled and (self.before_suspend or self.after_resume):
            raise ConfigError("agent hooks need enabled = true")

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> AgentSpec:
        """Parse the ``[agent]`` TOML table; raises ConfigError naming the bad key."""
        extra = sorted(set(table) - _KEYS)
        if extra:
            raise ConfigError(f"unknown [agent] keys {extra}")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError("agent.enabled must be a boolean")
        return cls(enabled=enabled,
                   before_suspend=_commands(table.get("before_suspend", []), "before_suspend"),
                   after_resume=_commands(table.get("after_resume", []), "after_resume"))

    def hooks_conf(self) -> bytes:
        """The ``hooks.conf`` file the agent reads."""
        lines = ["# ferry agent hooks: <phase> <command>, run in order by sh -c\n"]
        lines += [f"before_suspend {c}\n" for c in self.before_suspend]
        lines += [f"after_resume {c}\n" for c in self.after_resume]
        return "".join(lines).encode()
