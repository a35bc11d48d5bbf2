"""A VM holder in its own process: ``python -m ferry.node.process``.

``ferry vm run --detach`` and ``ferry vm receive --detach`` start one with
:func:`launch_detached`, which writes the request as one JSON line on the
child's stdin and reads JSON event lines from its stdout until the event it
waits for (then the child closes stdout and goes on holding the VM)::

    → {"kind": "run", "vm_id": ..., "package_dir": ..., "host": {...}, ...}
    → {"kind": "receive", "listen": [ADDR, PORT], "access": {...}, ...}
    ← {"event": "listening", "address": [ADDR, PORT]}        (receive --listen)
    ← {"event": "warm", "vm_id": "warm-...", "pid": ...}      (a warm run waits for its claim)
    ← {"event": "ready", "vm_id": ..., "pid": ..., ...}       (the VM runs)
    ← {"ok": false, "error": "...", "kind": "...", "handed_off": false}

``host`` is the caller's :class:`~ferry.hostconfig.HostConfig`: the holder
uses the directories and QEMU choices the CLI read from its environment, and
reads no environment itself. A warm run (``"warm": true``, :func:`start_warm`) keeps its
stdin open: end-of-file there before it was claimed (its daemon went away) discards it.
The child logs to ``<run root>/vms/.holder-<pid>.log`` (removed when it
exits cleanly) and runs in its own session, so the caller's Ctrl-C does not
reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.aio import log_task_stacks
from ferry.errors import ConfigError, FerryError
from ferry.hostconfig import HostConfig
from ferry.live.access import Access
from ferry.live.errors import LiveMigrationError
from ferry.live.launch import IDLE_TIMEOUT_S
from ferry.net import PortForward
from ferry.node.arrival import ArrivalRequest, arrive
from ferry.node.supervisor import LaunchRequest, supervise
from ferry.vm.errors import VMLifecycleError
from ferry.vm.registry import private_dir
from ferry.vm.userdata import DEFAULT_USER_DATA_TIMEOUT_S

if TYPE_CHECKING:
    from ferry.vm.mirroring import MirrorSpec

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT_S = 120.0

HolderRequest = LaunchRequest | ArrivalRequest


# -- the request on the pipe ----------------------------------------------------------------

def _forwards(fwds: tuple[PortForward, ...]) -> list[list[Any]]:
    return [f.to_json() for f in fwds]


def _address(value: Any) -> tuple[str, int] | None:
    return None if value is None else (str(value[0]), int(value[1]))


def encode_request(request: HolderRequest) -> bytes:
    data: dict[str, Any]
    if isinstance(request, LaunchRequest):
        data = {"kind": "run", "vm_id": request.vm_id,
                "forwards": None if request.forwards is None else _forwards(request.forwards),
                "package_dir": str(request.package_dir) if request.package_dir else None,
                "warm": request.warm, "service_address": request.service_address,
                "labels": None if request.labels is None else dict(request.labels),
                "env": dict(request.env), "user_data": request.user_data,
                "user_data_timeout_s": request.user_data_timeout_s,
                "volumes": dict(request.volumes),
                "mirror": None if request.mirror is None else request.mirror.to_json(),
                "restore": None if request.restore is None else request.restore.to_json(),
                "prime_ports": None if request.prime_ports is None
                else list(request.prime_ports)}
    else:
        data = {"kind": "receive", "listen": request.listen, "registry": request.registry,
                "package": request.package, "name": request.name,
                "precopy_only": request.precopy_only, "access": request.access.to_json(),
                "report_until": request.report_until,
                "idle_timeout_s": request.idle_timeout_s,
                "forwards": None if request.forwards is None else _forwards(request.forwards)}
    return json.dumps({"host": request.host.to_json()} | data).encode() + b"\n"


def _spec(value: Any) -> MirrorSpec | None:
    if value is None:
        return None
    from ferry.vm.mirroring import MirrorSpec  # (boto3: only holders that use S3 load it)

    return MirrorSpec.from_json(dict(value))


def decode_request(line: bytes) -> HolderRequest:
    """The request in ``line``; :class:`ConfigError` if it is not one."""
    try:
        d = json.loads(line)
        host = HostConfig.from_json(d["host"])
        fwd = d["forwards"]
        forwards = None if fwd is None else tuple(PortForward.from_json(f) for f in fwd)
        if d["kind"] == "run":
            return LaunchRequest(vm_id=d["vm_id"], host=host, forwards=forwards,
                                 package_dir=Path(d["package_dir"]) if d["package_dir"]
                                 else None, warm=bool(d.get("warm", False)),
                                 labels=d.get("labels"),
                                 service_address=d.get("service_address"),
                                 env=d.get("env") or {}, user_data=d.get("user_data"),
                                 user_data_timeout_s=float(d.get(
                                     "user_data_timeout_s", DEFAULT_USER_DATA_TIMEOUT_S)),
                                 volumes=d.get("volumes") or {},
                                 mirror=_spec(d.get("mirror")),
                                 restore=_spec(d.get("restore")),
                                 prime_ports=None if d.get("prime_ports") is None
                                 else tuple(int(p) for p in d["prime_ports"]))
        if d["kind"] == "receive":
            return ArrivalRequest(
                host=host, access=Access.from_json(d["access"]),
                listen=_address(d["listen"]), registry=_address(d["registry"]),
                package=d["package"], name=d["name"], forwards=forwards,
                precopy_only=bool(d["precopy_only"]), report_until=str(d["report_until"]),
                idle_timeout_s=float(d.get("idle_timeout_s", IDLE_TIMEOUT_S)))
        raise ValueError(f"unknown kind {d['kind']!r}")
    except (KeyError, TypeError, ValueError, IndexError, ConfigError) as exc:
        raise ConfigError(f"invalid holder request: {exc!r}") from exc


# -- the parent -----------------------------------------------------------------------------

def _failed(request: HolderRequest, text: str, handed_off: bool = False) -> FerryError:
    if isinstance(request, ArrivalRequest):
        return LiveMigrationError(text, vm=request.name, handed_off=handed_off)
    return VMLifecycleError(f"the supervisor failed to start the VM: {text}", vm=request.vm_id)


async def spawn_holder() -> asyncio.subprocess.Process:
    """A holder process, its imports done, waiting for its request on stdin (a daemon
    keeps one ready so a run skips Python's start-up, :mod:`ferry.daemon.warm`)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry.node.process", stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)


async def start_warm(request: LaunchRequest, *, timeout_s: float = LAUNCH_TIMEOUT_S,
                     holder: asyncio.subprocess.Process | None = None,
                     ) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start a warm VM (``request.warm``) in a holder process; return the process and its
    ``warm`` event once the VM waits for its claim. Its stdin stays open: closing it (or
    this process ending) before the claim discards the warm VM."""
    assert request.warm
    proc = holder if holder is not None and holder.returncode is None \
        else await spawn_holder()
    assert proc.stdin is not None
    proc.stdin.write(encode_request(request))
    await proc.stdin.drain()
    return proc, await _await_event(proc, request, "warm", timeout_s)


async def launch_detached(request: HolderRequest, *,
                          timeout_s: float = LAUNCH_TIMEOUT_S,
                          holder: asyncio.subprocess.Process | None = None) -> dict[str, Any]:
    """Start a holder process for ``request``; return the event it was started for
    (``ready`` for a run; ``request.report_until`` for a receive), with the child's ``pid``.

    ``holder``: a process from :func:`spawn_holder` to use instead of starting one.
    Raises :class:`VMLifecycleError` (a run) or :class:`LiveMigrationError` (a receive)
    with the child's error if it failed first.
    """
    until = request.report_until if isinstance(request, ArrivalRequest) else "ready"
    proc = holder if holder is not None and holder.returncode is None \
        else await spawn_holder()
    assert proc.stdin is not None
    proc.stdin.write(encode_request(request))
    await proc.stdin.drain()
    proc.stdin.close()
    return await _await_event(proc, request, until, timeout_s)


async def _await_event(proc: asyncio.subprocess.Process, request: HolderRequest, until: str,
                       timeout_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
            if not line:
                await proc.wait()
                raise _failed(request, "it exited silently")
            try:
                event = json.loads(line)
            except ValueError:
                event = {"ok": False, "error": f"unreadable report {line[:200]!r}"}
            if not event.get("ok", True):
                await proc.wait()
                raise _failed(request, str(event.get("error")), bool(event.get("handed_off")))
            if event.get("event") == until:
                event.pop("event")
                event["pid"] = proc.pid
                return dict(event)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise _failed(request, f"no report within {timeout_s} s") from exc


# -- the child ------------------------------------------------------------------------------

async def _end_of_file(fd: int) -> None:
    """Until ``fd`` (the launcher's pipe) reads end-of-file; no thread, so cancelling it
    leaves nothing blocked."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    eof: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data and not eof.done():
            eof.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await eof
    finally:
        loop.remove_reader(fd)

def main() -> int:
    """``python -m ferry.node.process``: see the module doc."""
    out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # nothing else may write into the launcher's pipe
    try:
        request = decode_request(sys.stdin.buffer.readline())
    except ConfigError as exc:
        out.write(json.dumps({"ok": False, "error": str(exc), "kind": "ConfigError"}) + "\n")
        return 2
    log_path = request.paths.run_root / "vms" / f".holder-{os.getpid()}.log"
    private_dir(log_path.parent)
    logging.basicConfig(level=logging.INFO, filename=log_path,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    os.dup2(fd, 2)  # QEMU's and Python's own complaints land in the log too
    os.close(fd)

    def emit(obj: dict[str, Any]) -> None:
        if out.closed:
            return
        out.write(json.dumps(obj) + "\n")
        out.flush()
        if obj.get("event") == ("ready" if isinstance(request, LaunchRequest)
                                else request.report_until) or obj.get("event") == "warm":
            out.close()

    async def run() -> None:
        # SIGUSR1: where every task waits, into the log (kill -USR1 on a stuck holder).
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, log_task_stacks, log)
        if isinstance(request, LaunchRequest):
            await supervise(request, on_ready=lambda r: emit({"event": "ready", **r}),
                            on_warm=lambda r: emit({"event": "warm", **r}),
                            parent_gone=_end_of_file(0) if request.warm else None)
            return
        main_task = asyncio.current_task()
        assert main_task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, main_task.cancel)
        await arrive(request,
                     on_listening=lambda a: emit({"event": "listening", "address": list(a)}),
                     on_ready=lambda r: emit({"event": "ready", **r}))

    code = 0
    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        code = 130
    except (FerryError, OSError) as exc:
        log.error("holding failed: %s", exc)
        emit({"ok": False, "error": str(exc), "kind": type(exc).__name__,
              "handed_off": bool(getattr(exc, "handed_off", False))})
        code = 1
    if code == 0:
        with contextlib.suppress(OSError):
            log_path.unlink()
    return code


if __name__ == "__main__":
    sys.exit(main())
