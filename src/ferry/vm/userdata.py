"""A VM's environment and user data (``ferry vm run -e/--env-file/--user-data``).

A VM from a package does not boot: it resumes a snapshot, so neither reaches the guest
through a kernel command line or a boot script. Both go through the guest agent after
the resume (:func:`apply_environment`, :func:`run_user_data`):

- **Environment**: written to ``/run/ferry/env`` in the guest (mode 0600, one
  ``NAME=VALUE`` per line, no quoting, as docker's ``--env-file``). The agent (1.2 and
  later) adds it to every command it starts: ``vm exec``, sessions (``exec -it``), the
  blueprint's hooks and the user data. ``/run`` is a tmpfs, so the file is guest
  memory: it survives suspend/continue and moves with a live migration. Processes that
  were already running in the snapshot do not see it (they started before); a service
  can read the file.
- **User data**: at most :data:`MAX_USER_DATA_BYTES`. A script (``#!``) is copied to
  ``/run/ferry/user-data`` and run once, as root, with the environment; its stdout and
  stderr go to the guest console (``ferry vm logs``). ``#cloud-config`` is a YAML subset
  applied by the host through the agent: ``write_files`` (``path``, ``content``,
  optional ``permissions`` as an octal string, ``encoding: b64``, ``append``) then
  ``runcmd`` (each a string for ``sh -c`` or a list for exec), in order, stopping at the
  first command that fails. Any other key, or any other format, is refused before the VM
  starts. The outcome (exit code, seconds) is in the run's ready report and ``vm inspect``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import re
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ferry.errors import ConfigError
from ferry.guest.agent import AgentClient

log = logging.getLogger(__name__)

MAX_ENV_VARS = 256
MAX_ENV_BYTES = 32 * 1024
"""All of ``NAME=VALUE\\n`` together (Linux allows far more; the agent reads up to 64 KiB)."""
MAX_USER_DATA_BYTES = 64 * 1024
"""EC2 allows 16 KiB, Azure 64 KiB: a script or a small config, not a payload channel."""
MAX_WRITE_FILES = 64
MAX_RUNCMD = 64
MIN_ENV_AGENT = (1, 2)
"""The first agent that gives commands the VM's environment."""
ENV_PATH = "/run/ferry/env"
USER_DATA_PATH = "/run/ferry/user-data"
DEFAULT_USER_DATA_TIMEOUT_S = 300.0
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def check_env(env: object) -> dict[str, str]:
    """``env`` as a checked dict: names ``[A-Za-z_][A-Za-z0-9_]*`` (at most 255), values
    without NUL or newline, at most :data:`MAX_ENV_VARS` and :data:`MAX_ENV_BYTES`."""
    if not isinstance(env, Mapping):
        raise ConfigError("the environment must be a mapping of name to value")
    if len(env) > MAX_ENV_VARS:
        raise ConfigError(f"at most {MAX_ENV_VARS} environment variables, not {len(env)}")
    out: dict[str, str] = {}
    total = 0
    for name, value in env.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"environment variable name {name!r:.70}: 1..255 of "
                              "[A-Za-z0-9_], not starting with a digit")
        if not isinstance(value, str) or "\0" in value or "\n" in value or "\r" in value:
            raise ConfigError(f"environment variable {name}: the value must be a string "
                              "without NUL, CR or newline")
        total += len(f"{name}={value}\n".encode())
        out[name] = value
    if total > MAX_ENV_BYTES:
        raise ConfigError(f"the environment is {total} bytes, more than {MAX_ENV_BYTES}")
    return out


def parse_env(items: Iterable[str], files: Iterable[str] = (), *,
              check: bool = True) -> dict[str, str]:
    """``--env-file`` contents (in order), then ``-e NAME=VALUE`` arguments: a later one
    wins. A file has one ``NAME=VALUE`` a line; blank lines and ``#`` comments are
    skipped (docker's format: no quoting, the value is the rest of the line).

    ``check=False`` leaves the names and values to the caller (an OCI image's process,
    :class:`ferry.oci.guest.RunOverrides`, takes any value but NUL)."""
    env: dict[str, str] = {}
    for text in files:
        # Split on "\n" only, as the agent reads the guest file (not str.splitlines,
        # which also splits on \x0b, \x1c, U+2028 and others a value may hold).
        for number, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")  # a CRLF file
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, value = line.partition("=")
            if not sep:
                raise ConfigError(f"--env-file line {number}: give NAME=VALUE")
            env[name.strip()] = value
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"-e {item!r:.70}: give NAME=VALUE")
        env[name] = value
    return check_env(env) if check else env


def env_file_bytes(env: Mapping[str, str]) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in env.items()).encode()


class UserDataKind(enum.Enum):
    SCRIPT = "script"
    CLOUD_CONFIG = "cloud-config"


@dataclass(frozen=True, slots=True)
class WriteFile:
    path: str
    content: bytes
    permissions: int = 0o644
    append: bool = False


@dataclass(frozen=True, slots=True)
class UserData:
    """Checked user data: a script, or the supported part of a ``#cloud-config``."""

    kind: UserDataKind
    script: bytes = b""
    write_files: tuple[WriteFile, ...] = ()
    runcmd: tuple[str | tuple[str, ...], ...] = ()


def parse_user_data(data: bytes | str) -> UserData:
    """Check ``data`` (a ``#!`` script or a ``#cloud-config``); :class:`ConfigError` else."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_USER_DATA_BYTES:
        raise ConfigError(f"user data is {len(raw)} bytes, at most {MAX_USER_DATA_BYTES}")
    if raw.startswith(b"#!"):
        return UserData(UserDataKind.SCRIPT, script=raw)
    first = raw.split(b"\n", 1)[0].strip()
    if first != b"#cloud-config":
        raise ConfigError("user data must start with '#!' (a script) or '#cloud-config'; "
                          "other cloud-init formats (MIME multipart, #include, "
                          "#cloud-boothook, gzip) are not supported")
    return _cloud_config(raw)


_CLOUD_KEYS = {"write_files", "runcmd"}
_FILE_KEYS = {"path", "content", "permissions", "encoding", "append", "owner", "defer"}


def _cloud_config(raw: bytes) -> UserData:
    import yaml  # only here: `vm run` without #cloud-config does not pay for it

    try:
        doc = yaml.safe_load(raw.decode())
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"#cloud-config is not valid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("#cloud-config must be a mapping")
    unknown = sorted(str(k) for k in doc if k not in _CLOUD_KEYS)
    if unknown:
        raise ConfigError(f"#cloud-config: {', '.join(unknown)} not supported (ferry "
                          "applies write_files and runcmd only)")
    files = doc.get("write_files") or []
    cmds = doc.get("runcmd") or []
    if not isinstance(files, list) or len(files) > MAX_WRITE_FILES:
        raise ConfigError(f"#cloud-config: write_files must be a list of at most "
                          f"{MAX_WRITE_FILES}")
    if not isinstance(cmds, list) or len(cmds) > MAX_RUNCMD:
        raise ConfigError(f"#cloud-config: runcmd must be a list of at most {MAX_RUNCMD}")
    return UserData(UserDataKind.CLOUD_CONFIG,
                    write_files=tuple(_write_file(i, f) for i, f in enumerate(files)),
                    runcmd=tuple(_command(i, c) for i, c in enumerate(cmds)))


def _write_file(index: int, entry: object) -> WriteFile:
    where = f"#cloud-config: write_files[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(str(k) for k in entry if k not in _FILE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} not supported")
    if entry.get("owner") not in (None, "root", "root:root", 0, "0:0"):
        raise ConfigError(f"{where}: only owner root is supported")
    path = entry.get("path")
    if (not isinstance(path, str) or not path.startswith("/") or len(path) > 4096
            or "\0" in path or "\n" in path or any(p == ".." for p in path.split("/"))):
        raise ConfigError(f"{where}: path must be an absolute path without '..'")
    content = entry.get("content", "")
    if not isinstance(content, str):
        raise ConfigError(f"{where}: content must be a string")
    encoding = entry.get("encoding", "text/plain")
    if encoding in ("b64", "base64"):
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{where}: content is not valid base64") from exc
    elif encoding in ("text/plain", None):
        data = content.encode()
    else:
        raise ConfigError(f"{where}: encoding {encoding!r:.30} not supported (b64 or text)")
    perms = entry.get("permissions", "0644")
    if isinstance(perms, int):  # YAML reads an unquoted 0644 as the integer 420
        mode = perms
    elif isinstance(perms, str) and re.fullmatch(r"0?o?[0-7]{1,4}", perms):
        mode = int(perms.replace("o", ""), 8)
    else:
        raise ConfigError(f"{where}: permissions must be octal, like '0644'")
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"{where}: permissions {mode:o} out of range")
    append = entry.get("append", False)
    if not isinstance(append, bool):
        raise ConfigError(f"{where}: append must be true or false")
    return WriteFile(path, data, mode, append)


def _command(index: int, cmd: object) -> str | tuple[str, ...]:
    where = f"#cloud-config: runcmd[{index}]"
    if isinstance(cmd, str) and cmd.strip() and "\0" not in cmd:
        return cmd
    if (isinstance(cmd, list) and cmd and len(cmd) <= 4096
            and all(isinstance(a, str) and "\0" not in a for a in cmd)):
        return tuple(cmd)
    raise ConfigError(f"{where} must be a non-empty string or list of strings")


def _agent_version(agent: AgentClient) -> tuple[int, ...]:
    hello = agent.hello
    version = hello.agent_version if hello is not None else ""
    m = re.search(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


async def apply_environment(agent: AgentClient, env: Mapping[str, str], *,
                            timeout_s: float = 30.0) -> None:
    """Write ``env`` to the guest's :data:`ENV_PATH` (atomically, mode 0600)."""
    await agent.wait_ready(timeout_s=timeout_s)
    if _agent_version(agent) < MIN_ENV_AGENT:
        assert agent.hello is not None
        raise ConfigError(f"the guest's agent ({agent.hello.agent_version}) predates the "
                          "VM environment (ferry-agent 1.2): snapshot the package again "
                          "with this ferry")
    r = await agent.exec(["/bin/sh", "-c", f"umask 077 && mkdir -p /run/ferry && "
                          f"cat > {ENV_PATH}.new && mv {ENV_PATH}.new {ENV_PATH}"],
                         stdin=env_file_bytes(env), timeout_s=timeout_s)
    if r.exit_code != 0:
        raise ConfigError(f"could not write {ENV_PATH} in the guest (exit {r.exit_code}): "
                          f"{r.stderr.decode(errors='replace')[:200]}")


@dataclass(frozen=True, slots=True)
class UserDataResult:
    kind: UserDataKind
    exit_code: int
    duration_s: float
    failed_step: str | None = None
    """What failed: ``write_files[i]``, ``runcmd[i]`` or ``script`` (None: all exited 0)."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "exit_code": self.exit_code,
                "duration_s": round(self.duration_s, 3), "failed_step": self.failed_step}


_CONSOLE = "exec >/dev/console 2>&1; "


async def run_user_data(agent: AgentClient, data: UserData, *,
                        timeout_s: float = DEFAULT_USER_DATA_TIMEOUT_S,
                        clock: Callable[[], float] = time.monotonic) -> UserDataResult:
    """Apply ``data`` once in the guest (see the module doc); output to the console.

    ``timeout_s`` bounds the whole; a step that runs out is killed (exit code 124)."""
    t0 = clock()

    def left() -> float:
        return max(1.0, timeout_s - (clock() - t0))

    def done(code: int, step: str | None) -> UserDataResult:
        log.info("user data (%s): exit %d%s", data.kind.value, code,
                 f" at {step}" if step else "")
        return UserDataResult(data.kind, code, clock() - t0, step if code else None)

    if data.kind is UserDataKind.SCRIPT:
        r = await agent.exec(["/bin/sh", "-c", f"umask 077 && mkdir -p /run/ferry && "
                              f"cat > {USER_DATA_PATH} && chmod 0700 {USER_DATA_PATH}"],
                             stdin=data.script, timeout_s=left())
        if r.exit_code != 0:
            return done(r.exit_code, "copy")
        r = await agent.exec(["/bin/sh", "-c", _CONSOLE + f"echo 'ferry: user data'; "
                              f"{USER_DATA_PATH}; s=$?; echo \"ferry: user data exited $s\"; "
                              "exit $s"], timeout_s=left())
        return done(r.exit_code, "script")
    for i, f in enumerate(data.write_files):
        redirect = ">>" if f.append else ">"
        r = await agent.exec(
            ["/bin/sh", "-c", f'mkdir -p "$(dirname "$1")" && cat {redirect} "$1" && '
             'chmod "$2" "$1"', "sh", f.path, f"{f.permissions:o}"],
            stdin=f.content, timeout_s=left())
        if r.exit_code != 0:
            await _console_note(agent, f"ferry: user data write_files[{i}] {f.path} failed: "
                                f"{r.stderr.decode(errors='replace')[:200]}")
            return done(r.exit_code, f"write_files[{i}]")
    for i, cmd in enumerate(data.runcmd):
        shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
        argv = ["/bin/sh", "-c", _CONSOLE + f"echo {shlex.quote('ferry: runcmd ' + shown)}; "
                + (cmd if isinstance(cmd, str) else 'exec "$@"'), "sh"]
        if not isinstance(cmd, str):
            argv += list(cmd)
        r = await agent.exec(argv, timeout_s=left())
        if r.exit_code != 0:
            await _console_note(agent, f"ferry: runcmd[{i}] exited {r.exit_code}")
            return done(r.exit_code, f"runcmd[{i}]")
    return done(0, None)


async def _console_note(agent: AgentClient, line: str) -> None:
    await agent.exec(["/bin/sh", "-c", 'echo "$1" >/dev/console', "sh", line], timeout_s=10)
