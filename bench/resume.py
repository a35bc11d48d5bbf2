"""Benchmark: Redis reachable on a forwarded port, cold boot vs resuming its package.

Setup (not timed): build the Redis blueprint, snapshot it (with a key
written), sign the package and verify/extract it into a private cache.
Then, ``--reps`` times each, alternating:

* **cold boot**: a supervisor-like child process (ferry already imported,
  as a node daemon would be) boots the blueprint with RAM on FUSE, root
  disk on NBD, its own network namespace and the port forward;
* **resume**: the same kind of child resumes the package
  (:func:`ferry.node.supervisor.supervise`, what ``ferry vm run`` runs);
* **qemu-shm** (baseline, plain QEMU): a warm child (the QMP client imported)
  spawns ``qemu-system-x86_64`` with the package's kernel, initramfs and
  machine (manifest: machine, CPU model, vCPUs, memory, accelerator, kernel
  command line, the same device set, built by :mod:`ferry.qemu.argv`), guest
  RAM = a copy of the package's memory image in a file on tmpfs
  (``/dev/shm``, ``memory-backend-file,share=on``), the root disk a raw copy
  on tmpfs, ``-incoming defer -S``; then what ferry's resume does to QEMU:
  ``x-ignore-shared``, ``migrate-incoming`` on a UNIX socket, the package's
  72 KB device state fed into it, ``cont``. No FUSE, NBD or supervisor.
  Copying the RAM and disk files to tmpfs is setup, not timed: a user
  restoring with plain QEMU would have them ready;
* **qemu-statefile** (baseline, plain QEMU): once during setup, the
  package's guest is restored as for qemu-shm (paused, never run) and
  migrated with its RAM (``x-ignore-shared`` off) to ``exec:cat > FILE`` on
  tmpfs: one full QEMU state file (~96 MB) of the same guest moment as the
  package. Each rep restores it with anonymous RAM
  (``memory-backend-ram``, same RAM block name) via ``-incoming fd:N -S``
  (QEMU inherits the file open: no ``cat`` process and pipe as with
  ``exec:cat FILE``), waits for the load and sends ``cont``.

Both baselines need the guest's network exactly as it was saved: the
virtio-net state of a guest saved on a tap with ``vnet_hdr`` does not load
on QEMU user-net (``virtio-net: saved image requires vnet_hdr=on``), so they
get what ferry's resume gets: a :class:`ferry.net.VMNetwork` namespace with
the tap, the fixed guest address/gateway and a port forward on 127.0.0.1,
held until the child reports the guest running (as ferry's runner opens its
forwards after ``cont``). Unlike ferry's resume, where building that network
overlaps the QEMU start inside the timed span, the baselines build it
before "go" (untimed). QEMU is started through ``setpriv --pdeathsig KILL``
like ferry's; every QEMU, namespace and tmpfs file is removed after each
rep, also on failure. ``--no-baselines`` skips them.

Each rep runs all of them in this order, so drift on the shared machine hits
every kind alike. The clock starts when the parent tells the warm child "go"
and stops at the first ``+PONG`` read from the forwarded port on 127.0.0.1.
The client probes like a user retrying (``--probe serial``, default): one connection at a
time, a refused one retried 5 ms after the previous attempt began, an
accepted one waited for (ferry holds it until the guest runs), with another
attempt joining every 50 ms while none is answered (a SYN sent to a guest
that is still booting is lost, and TCP would retry it only after 1 s).
``--probe flood`` opens a new attempt every 5 ms regardless (the old method:
every attempt made before the guest runs is one more connection it must
serve at once, and each lost SYN waits for TCP's retransmit).

The resume breakdown comes from the child's report (see
:class:`ferry.vm.runner.ResumeTimings` for what overlaps what); right after
the first PONG the parent asks the supervisor's control socket how much
guest RAM went through FUSE and how much CPU QEMU used, to tell where the
time between "running" and the PONG went. ``--cli-reps`` adds the time of
the whole ``ferry vm run --detach`` command, Python start included.

``--json`` reports medians (p50) over the reps: ``resume_ms`` (ferry),
``qemu_shm_resume_ms``, ``qemu_statefile_resume_ms``, ``resume_ratio``
(``resume_ms / qemu_shm_resume_ms``: how much slower ferry's resume is than
plain QEMU with its RAM already in a shared tmpfs file), ``statefile_ratio``
(``resume_ms / qemu_statefile_resume_ms``), and each baseline's breakdown
(spawn until QMP answers, load, cont, running, running until the PONG).
Measured here (TCG, 2 cores shared with other work): see docs/vm.md.

    .venv/bin/python bench/resume.py --reps 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry.testing.probe import first_pong, ping_once

SpecFor = Callable[[int], Awaitable[tuple[dict[str, Any], Callable[[], None]]]]
"""A baseline rep's setup: ``spec_for(port)`` -> (the child's spec, call once running)."""

CHILD = r"""
import asyncio, dataclasses, json, os, signal, sys
from pathlib import Path
from ferry.hostconfig import HostConfig
from ferry.net import PortForward
from ferry.storage import FileDevice
from ferry.vm.registry import VMPaths
from ferry.vm.snapshot import booted
from ferry.node.supervisor import LaunchRequest, supervise
from ferry.guest.image import build_blueprint

mode, root, port, vm_id = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
host = dataclasses.replace(HostConfig.from_environ(os.environ), run_root=root / "run",
                           state_root=root / "state")
paths = VMPaths.of(host)
fwd = PortForward("127.0.0.1", port, 6379)

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()

async def cold():
    image = build_blueprint("redis", root / vm_id, cache_dir=host.cache_root)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    say({"ready": True}); sys.stdin.readline()
    async with FileDevice(root / vm_id / "memory", size_bytes=image.blueprint.memory_mib << 20,
                          create=True) as mem, FileDevice(image.rootfs) as disk:
        async with booted("redis", mem, disk, work_dir=root / vm_id / "w", forwards=[fwd],
                          host=host, image=image) as b:
            say({"boot_to_agent_s": b.boot_to_agent_s, "ready_s": b.ready_s})
            await stop.wait()

async def resume():
    request = LaunchRequest(vm_id, Path(sys.argv[5]), host, (fwd,))
    say({"ready": True}); sys.stdin.readline()
    await supervise(request, on_ready=say)

asyncio.run(cold() if mode == "cold" else resume())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis_get(port: int, key: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {key}\r\n".encode())
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[1]


async def one_run(mode: str, root: Path, vm_id: str, package_dir: Path | None,
                  check_key: bool, probe: str = "serial",
                  spec_for: SpecFor | None = None) -> dict[str, Any]:
    """One rep in a warm child: ``cold``/``resume`` (ferry) or a plain-QEMU baseline
    (:data:`BASELINE_MODES`, whose child runs the spec ``spec_for(port)`` returns)."""
    port = _free_port()
    on_running: Callable[[], None] | None = None
    if spec_for is not None:
        spec, on_running = await spec_for(port)
        args = [sys.executable, __file__, "--baseline-child", json.dumps(spec)]
    else:
        args = [sys.executable, "-c", CHILD, mode, str(root), str(port), vm_id]
        if package_dir is not None:
            args.append(str(package_dir))
    child_log = Path(spec["log"] + ".child") if spec_for is not None else None
    err = os.open(child_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644) \
        if child_log is not None else subprocess.DEVNULL
    try:
        proc = await asyncio.create_subprocess_exec(*args, stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, stderr=err)
    finally:
        if child_log is not None:
            os.close(err)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert json.loads(await proc.stdout.readline()) == {"ready": True}
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        go = time.monotonic()
        # The child's report (one line) arrives once the guest runs (a cold boot: once
        # ready); a baseline's held forward opens then, as ferry's does.
        report_line = asyncio.create_task(proc.stdout.readline())
        if on_running is not None:
            report_line.add_done_callback(lambda _: on_running())
        seconds = await _unless_exited(proc, first_pong(port, probe))
        pong = time.monotonic()
        at_pong = await _status(root, vm_id) if mode == "resume" else {}
        t0 = time.monotonic()
        warm_ok = await ping_once(port)
        warm_ms = (time.monotonic() - t0) * 1e3
        report = json.loads(await report_line)
        result = {"ms": seconds * 1e3, "report": report, "at_pong": at_pong,
                  "next_ping_ms": warm_ms if warm_ok else None}
        resume = report.get("resume")
        if resume:
            # CLOCK_MONOTONIC is system-wide: the child's instants line up with ours.
            launched = resume["launched_monotonic_s"]
            result["go_to_launch_ms"] = (launched - go) * 1e3
            result["running_to_pong_ms"] = (pong - launched - resume["running_s"]) * 1e3
        if check_key:
            result["key"] = await asyncio.to_thread(_redis_get, port, "snapshotted")
        return result
    except BaseException:
        if spec_for is not None:
            assert child_log is not None
            print(f"{mode} failed; child: {_tail(child_log)}\nQEMU: {_tail(Path(spec['log']))}",
                  file=sys.stderr)
        raise
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- plain QEMU baselines -------------------------------------------------------------

BASELINE_MODES = ("qemu-shm", "qemu-statefile")
SHM_ROOT = Path("/dev/shm")
QMP_TIMEOUT_S = 30.0
STATE_FD_ARG = "fd:STATEFILE"
"""qemu-statefile's ``-incoming`` in a spec's argv: replaced by ``fd:N`` at spawn."""
_SETPRIV = shutil.which("setpriv")


def _qemu_launch_argv(argv: list[str]) -> list[str]:
    """``argv`` run so QEMU gets SIGKILL when the process that spawned it dies (no
    QEMU outlives a crashed bench), the way ferry launches it (without ferry's sandbox)."""
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv] if _SETPRIV else argv


async def _spawn_qemu(argv: list[str], log: Path,
                      incoming_file: Path | None = None) -> asyncio.subprocess.Process:
    """Spawn QEMU; with ``incoming_file``, QEMU inherits it open and
    :data:`STATE_FD_ARG` in ``argv`` becomes ``fd:N``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    state_fd = os.open(incoming_file, os.O_RDONLY) if incoming_file is not None else None
    try:
        if state_fd is not None:
            argv = [f"fd:{state_fd}" if a == STATE_FD_ARG else a for a in argv]
        return await asyncio.create_subprocess_exec(
            *_qemu_launch_argv(argv), stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
            pass_fds=() if state_fd is None else (state_fd,))
    finally:
        os.close(fd)
        if state_fd is not None:
            os.close(state_fd)


async def _end_qemu(proc: asyncio.subprocess.Process, qmp: Any | None) -> None:
    """QMP ``quit``, SIGKILL if QEMU is still there after 5 s; always reaped."""
    if proc.returncode is None and qmp is not None:
        with contextlib.suppress(Exception):
            await qmp.execute("quit", timeout_s=5.0)
    if qmp is not None:
        with contextlib.suppress(Exception):
            await qmp.close()
    try:
        await asyncio.wait_for(proc.wait(), 5.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _wait_migration(qmp: Any, what: str) -> None:
    """Poll ``query-migrate`` every 2 ms (as ferry does) until completed."""
    deadline = time.monotonic() + QMP_TIMEOUT_S
    while True:
        info = await qmp.execute("query-migrate", timeout_s=QMP_TIMEOUT_S)
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: migration {status}: {info.get('error-desc', '')}")
        await asyncio.sleep(0.002)


async def _load_device_state(qmp: Any, spec: dict[str, Any]) -> None:
    """What ferry's QemuVM.start_incoming + load_device_state do: ``x-ignore-shared`` (RAM
    is the shared file), ``migrate-incoming`` on a UNIX socket, the package's device state
    (no RAM) fed into it. The caller waits for the load to complete."""
    from ferry.qemu.devstate import load, send_stream

    data = await load(Path(spec["state"]), vm=spec["mode"])
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}]}, timeout_s=QMP_TIMEOUT_S)
    await qmp.execute("migrate-incoming", {"uri": f"unix:{spec['migrate_sock']}"},
                      timeout_s=QMP_TIMEOUT_S)
    await send_stream(Path(spec["migrate_sock"]), data, vm=spec["mode"],
                      timeout_s=QMP_TIMEOUT_S)


async def _restore(spec: dict[str, Any]) -> tuple[asyncio.subprocess.Process, Any,
                                                    dict[str, float]]:
    """Spawn plain QEMU from ``spec`` and bring it to running; returns the process, its
    QMP client and timings (seconds)."""
    from ferry.qemu.qmp import QMPClient

    launched = time.monotonic()
    statefile = Path(spec["statefile"]) if spec["mode"] == "qemu-statefile" else None
    proc = await _spawn_qemu(spec["argv"], Path(spec["log"]), statefile)
    qmp = None
    try:
        qmp = await QMPClient.connect_unix(spec["qmp"], name=spec["mode"],
                                           timeout_s=QMP_TIMEOUT_S)
        spawn_s = time.monotonic() - launched
        t0 = time.monotonic()
        if spec["mode"] == "qemu-shm":
            await _load_device_state(qmp, spec)
        await _wait_migration(qmp, "load")
        load_s = time.monotonic() - t0
        t1 = time.monotonic()
        mark = qmp.event_mark()
        await qmp.execute("cont", timeout_s=QMP_TIMEOUT_S)
        await qmp.wait_event("RESUME", since=mark, timeout_s=QMP_TIMEOUT_S)
        now = time.monotonic()
        return proc, qmp, {"launched_monotonic_s": launched, "spawn_s": spawn_s,
                           "load_s": load_s, "cont_s": now - t1, "running_s": now - launched}
    except BaseException:
        await _end_qemu(proc, qmp)
        raise


async def baseline_child(spec: dict[str, Any]) -> None:
    """The warm child of a plain-QEMU rep: "ready", wait for "go", restore, report,
    and keep QEMU running until SIGTERM (then quit it)."""
    import ferry.qemu.devstate
    import ferry.qemu.qmp  # noqa: F401

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)
    proc, qmp, timings = await _restore(spec)
    try:
        sys.stdout.write(json.dumps({"resume": timings}) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await _end_qemu(proc, qmp)


class Baselines:
    """Plain-QEMU copies of the package's guest (no FUSE, NBD or ferry supervisor).

    Files live in one directory on tmpfs (``/dev/shm``); :meth:`close` removes it.
    Per rep (:meth:`rep`): a fresh copy of the root disk, for ``qemu-shm`` a fresh
    copy of the package's memory image (the guest writes both), and the guest's
    network namespace with its tap and port forward (ferry.net, as ferry's resume has).
    """

    def __init__(self, opened: Any) -> None:
        self.opened = opened
        self.manifest = opened.manifest
        self.dir = Path(tempfile.mkdtemp(prefix="fbr-qemu-", dir=SHM_ROOT))
        self.statefile = self.dir / "full-state.bin"
        self.statefile_bytes = 0
        self.statefile_save_s = 0.0

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def rep(self, mode: str, name: str) -> AsyncIterator[SpecFor]:
        """Untimed setup of one rep; yields ``spec_for(port)``, which makes the network
        (forward on ``port``) and returns the child's spec and what to call once the
        guest runs (open the held forward, as ferry's runner does after ``cont``)."""
        from ferry.net import PortForward, VMNetwork
        from ferry.qemu.argv import TapNet
        from ferry.testing.qemu_native import package_argv, sparse_copy

        rep_dir = self.dir / name
        rep_dir.mkdir()
        try:
            disk = self.manifest.disks[0]
            await asyncio.to_thread(sparse_copy, self.opened.directory / disk.path,
                                    rep_dir / "root.img")
            memory_path = None
            if mode == "qemu-shm":
                memory_path = rep_dir / "memory"
                await asyncio.to_thread(sparse_copy,
                                        self.opened.directory / self.manifest.memory.path,
                                        memory_path)
            # qemu-statefile: the child opens the file and QEMU inherits the descriptor
            # (``fd:``); no cat process and pipe in between as with ``exec:cat FILE``.
            incoming = "defer" if mode == "qemu-shm" else STATE_FD_ARG
            async with contextlib.AsyncExitStack() as stack:

                async def spec_for(port: int) -> tuple[dict[str, Any], Callable[[], None]]:
                    net = VMNetwork(f"b-{name}", [PortForward("127.0.0.1", port, 6379)],
                                    run_dir=self.dir / "net", hold_forwards=True)
                    await stack.enter_async_context(net)
                    argv = package_argv(self.opened, disk=rep_dir / "root.img",
                                        memory_path=memory_path, run_dir=rep_dir,
                                        net=TapNet(net.tap_name, mac=net.guest_mac),
                                        incoming=incoming, paused=True)
                    spec = {"mode": mode, "argv": net.wrap_argv(argv),
                            "log": str(rep_dir / "qemu.log"), "qmp": str(rep_dir / "qmp.sock"),
                            "migrate_sock": str(rep_dir / "migrate-in.sock"),
                            "state": str(self.opened.directory / self.manifest.state),
                            "statefile": str(self.statefile)}
                    return spec, net.open_forwards

                yield spec_for
        finally:
            shutil.rmtree(rep_dir, ignore_errors=True)

    async def make_statefile(self) -> None:
        """Setup: restore the package's guest as ``qemu-shm`` does (paused, never run) and
        migrate it, RAM included, to ``exec:cat > FILE`` on tmpfs: the same guest moment
        as the package, as one full QEMU state file."""
        async with self.rep("qemu-shm", "statefile-src") as spec_for:
            spec, _ = await spec_for(_free_port())
            from ferry.qemu.qmp import QMPClient

            proc = await _spawn_qemu(spec["argv"], Path(spec["log"]))
            qmp = None
            try:
                qmp = await QMPClient.connect_unix(spec["qmp"], timeout_s=QMP_TIMEOUT_S)
                await _load_device_state(qmp, spec)
                await _wait_migration(qmp, "load")
                await qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": False}]})
                t0 = time.monotonic()
                await qmp.execute("migrate", {"uri": f"exec:cat > {self.statefile}"})
                await _wait_migration(qmp, "save")
                self.statefile_save_s = time.monotonic() - t0
            except BaseException:
                print(_tail(Path(spec["log"])), file=sys.stderr)
                raise
            finally:
                await _end_qemu(proc, qmp)
        self.statefile_bytes = self.statefile.stat().st_size


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


async def _unless_exited(proc: asyncio.subprocess.Process, wait: Awaitable[float]) -> float:
    """``wait``'s result, or RuntimeError as soon as the child exits before it."""
    task = asyncio.ensure_future(wait)
    exited = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait([task, exited], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise RuntimeError(f"the child exited with {proc.returncode} before the first PONG")
        return task.result()
    finally:
        for t in (task, exited):
            t.cancel()
        await asyncio.gather(task, exited, return_exceptions=True)


async def _status(root: Path, vm_id: str) -> dict[str, Any]:
    """The supervisor's live counters: guest RAM read through FUSE, QEMU's CPU use."""
    from ferry.node.control import ControlClient
    from ferry.vm.registry import VMPaths

    paths = VMPaths(root / "run", root / "state")
    try:
        reply = await ControlClient(paths.control_socket(vm_id), vm_id).status()
    except Exception as exc:  # diagnosis only: the bench result does not depend on it
        return {"error": str(exc)}
    return {**reply.memory_io, "qemu": dict(reply.qemu_usage)}


async def cli_run(root: Path, package: Path, env: dict[str, str], probe: str) -> float:
    port = _free_port()
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry.cli.main", "vm", "run", "--detach", "--name", "cli",
        "-p", f"127.0.0.1:{port}:6379", str(package), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await first_pong(port, probe)
        return (time.monotonic() - t0) * 1e3
    finally:
        await proc.wait()
        stop = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ferry.cli.main", "vm", "stop", "cli", env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await stop.wait()


async def bench(reps: int, cli_reps: int, progress: bool, probe: str,
                baselines: bool = True) -> dict[str, Any]:
    from ferry.hostconfig import HostConfig
    from ferry.package import TrustStore, generate_key, load_private_key, write_package
    from ferry.vm.manifest import VMManifest
    from ferry.vm.pkgcache import open_package
    from ferry.vm.snapshot import snapshot

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="fbr-"))
    stack = contextlib.ExitStack()
    base: Baselines | None = None
    try:
        say("snapshotting redis")
        t0 = time.monotonic()
        host = dataclasses.replace(HostConfig.from_environ(os.environ), run_root=root / "run",
                                   state_root=root / "state")
        snap = await snapshot("redis", root / "pkg", prepare=["redis-cli set snapshotted yes"],
                              host=host)
        snapshot_s = time.monotonic() - t0
        generate_key(root / "k.key")
        trust = TrustStore.from_path(root / "trust", missing_ok=True).add(root / "k.key.pub")
        info = write_package(root / "pkg", root / "redis.ferry", load_private_key(root / "k.key"),
                             manifest=VMManifest.load(root / "pkg").to_json())
        opened = open_package(root / "redis.ferry", trust, cache_dir=root / "pkgcache")
        if baselines:
            base = Baselines(opened)
            stack.callback(base.close)
            say("saving a full QEMU state file (setup)")
            await base.make_statefile()
        cold: list[dict[str, Any]] = []
        resumed: list[dict[str, Any]] = []
        plain: dict[str, list[dict[str, Any]]] = {m: [] for m in BASELINE_MODES}
        for i in range(reps):
            say(f"rep {i + 1}/{reps}: cold boot")
            cold.append(await one_run("cold", root, f"cold{i}", None, False, probe))
            say(f"rep {i + 1}/{reps}: resume ({cold[-1]['ms']:.0f} ms cold)")
            resumed.append(await one_run("resume", root, f"res{i}", opened.directory, True,
                                         probe))
            say(f"           resumed in {resumed[-1]['ms']:.0f} ms")
            for mode in BASELINE_MODES if base is not None else ():
                assert base is not None
                async with base.rep(mode, f"{mode.removeprefix('qemu-')}{i}") as spec_for:
                    plain[mode].append(await one_run(mode, root, mode, None, True, probe,
                                                     spec_for))
                say(f"           {mode} in {plain[mode][-1]['ms']:.0f} ms")
        cli_ms: list[float] = []
        env = {**os.environ, "FERRY_RUN_DIR": str(root / "run"),
               "FERRY_STATE_DIR": str(root / "state"), "FERRY_TRUST_DIR": str(root / "trust"),
               "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}
        for i in range(cli_reps):
            say(f"cli rep {i + 1}/{cli_reps}")
            cli_ms.append(await cli_run(root, root / "redis.ferry", env, probe))
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)

    cold_ms = statistics.median(r["ms"] for r in cold)
    resume_ms = statistics.median(r["ms"] for r in resumed)
    fields = [k for k in resumed[0]["report"]["resume"]
              if k.endswith("_s") and k != "launched_monotonic_s"]
    breakdown = {f"{k.removesuffix('_s')}_ms": round(statistics.median(
        r["report"]["resume"][k] for r in resumed) * 1e3, 1) for k in fields}
    breakdown["running_to_pong_ms"] = _median(r.get("running_to_pong_ms") for r in resumed)
    return {
        "reps": reps,
        "probe": probe,
        "cold_boot_ms": round(cold_ms, 1),
        "resume_ms": round(resume_ms, 1),
        "speedup": round(cold_ms / resume_ms, 1),
        "redis_ok": all(r["key"] == b"yes" for r in resumed),
        "cold_boot_ms_all": [round(r["ms"], 1) for r in cold],
        "resume_ms_all": [round(r["ms"], 1) for r in resumed],
        "resume_breakdown_ms": breakdown,
        "after_running": _after_running(resumed),
        "next_ping_ms": _median(r.get("next_ping_ms") for r in resumed),
        "resume_cli_ms": round(statistics.median(cli_ms), 1) if cli_ms else None,
        **_baseline_fields(resume_ms, plain, base),
        "snapshot_s": round(snapshot_s, 2),
        "state_bytes": snap.device_state.state_bytes,
        "package_bytes": info.compressed_bytes,
        "memory_mib": snap.manifest.machine.memory_mib,
        "accel": snap.manifest.machine.accel,
    }


def _baseline_fields(resume_ms: float, plain: dict[str, list[dict[str, Any]]],
                     base: Baselines | None) -> dict[str, Any]:
    """``qemu_shm_resume_ms``, ``qemu_statefile_resume_ms`` (p50), ``resume_ratio``
    (ferry's p50 / qemu-shm's) and the baselines' details."""
    if base is None or not plain["qemu-shm"]:
        return {}
    out: dict[str, Any] = {}
    for mode, runs in plain.items():
        key = mode.replace("-", "_")
        out[f"{key}_resume_ms"] = round(statistics.median(r["ms"] for r in runs), 1)
    out["resume_ratio"] = round(resume_ms / out["qemu_shm_resume_ms"], 2)
    out["statefile_ratio"] = round(resume_ms / out["qemu_statefile_resume_ms"], 2)
    for mode, runs in plain.items():
        key = mode.replace("-", "_")
        out[f"{key}_resume_ms_all"] = [round(r["ms"], 1) for r in runs]
        out[f"{key}_breakdown_ms"] = {
            f"{k.removesuffix('_s')}_ms": round(statistics.median(
                r["report"]["resume"][k] for r in runs) * 1e3, 1)
            for k in ("spawn_s", "load_s", "cont_s", "running_s")}
        out[f"{key}_breakdown_ms"]["running_to_pong_ms"] = _median(
            r.get("running_to_pong_ms") for r in runs)
    out["baseline_redis_ok"] = all(r["key"] == b"yes" for runs in plain.values() for r in runs)
    out["qemu_statefile_bytes"] = base.statefile_bytes
    out["qemu_statefile_save_ms"] = round(base.statefile_save_s * 1e3, 1)
    return out


def _median(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _after_running(resumed: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of what happened between "running" and the first PONG (diagnosis)."""
    reads, mib, cpu, wait, minflt = [], [], [], [], []
    for r in resumed:
        at_pong, resume = r.get("at_pong", {}), r["report"]["resume"]
        if "reads" in at_pong:
            reads.append(at_pong["reads"] - resume["ram_reads_at_running"])
            mib.append((at_pong["bytes_read"] - resume["ram_read_bytes_at_running"]) / 2**20)
        q0, q1 = resume.get("qemu_at_running") or {}, at_pong.get("qemu") or {}
        if q0 and q1:
            cpu.append((q1["cpu_s"] - q0["cpu_s"]) * 1e3)
            wait.append((q1["runqueue_wait_s"] - q0["runqueue_wait_s"]) * 1e3)
            minflt.append(q1["minflt"] - q0["minflt"])
    return {"fuse_reads": _median(reads), "fuse_read_mib": _median(mib),
            "qemu_cpu_ms": _median(cpu), "qemu_runqueue_wait_ms": _median(wait),
            "qemu_minor_faults": _median(minflt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cli-reps", type=int, default=2,
                        help="also time the whole 'ferry vm run --detach' command")
    parser.add_argument("--probe", choices=("serial", "flood"), default="serial",
                        help="how the client looks for the first PONG (see the module doc)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip the plain-QEMU resumes (qemu-shm, qemu-statefile)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        asyncio.run(baseline_child(json.loads(args.baseline_child)))
        return
    result = asyncio.run(bench(args.reps, args.cli_reps, progress=not args.json,
                               probe=args.probe, baselines=args.baselines))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:>30}: {value}")
    if "resume_ratio" in result:
        print(f"\nferry resume {result['resume_ms']} ms (p50) vs plain QEMU: shared-RAM "
              f"{result['qemu_shm_resume_ms']} ms (ratio {result['resume_ratio']}), full state "
              f"file {result['qemu_statefile_resume_ms']} ms (ratio {result['statefile_ratio']})")


if __name__ == "__main__":
    main()
