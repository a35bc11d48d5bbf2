"""Named network namespaces: create, delete, list, run commands in, open sockets in.

Namespaces are iproute2's named ones (a bind mount under ``/run/netns``),
so ``ip netns list`` and ``ip netns exec`` see everything ferry makes. Every
name ferry creates starts with :data:`PREFIX`; that is how leftovers are
recognised.

:func:`socket_in_netns` creates a socket inside another namespace without
running a process there: a short-lived thread ``setns()``\\ s into the
namespace, calls ``socket()`` and switches back. A socket belongs for its
whole life to the namespace it was created in, so the event loop can then
use it like any other. A fresh thread per call keeps a failed switch-back
from poisoning a pooled thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import re
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from ferry.net.command import run
from ferry.net.errors import NamespaceError, NetConfigError

PREFIX = "ferry-"
"""Every namespace, link and (with ``_``) nft table ferry creates starts with this."""

NETNS_DIR = Path("/run/netns")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CLONE_NEWNET = 0x40000000


def check_name(name: str) -> str:
    """Return ``name`` if it is a usable namespace name, else raise NetConfigError."""
    if not _NAME_RE.match(name):
        raise NetConfigError(f"invalid network namespace name {name!r}")
    return name


def netns_path(name: str) -> Path:
    """The bind-mount file that pins the namespace ``name``."""
    return NETNS_DIR / check_name(name)


def exists(name: str) -> bool:
    """Whether the named namespace exists."""
    return netns_path(name).exists()


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of existing namespaces starting with ``prefix``, sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_exec_argv(namespace: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so it runs inside ``namespace`` (unchanged for ``None``).

    This is how QEMU is started inside a VM's namespace.
    """
    if namespace is None:
        return list(argv)
    return ["ip", "netns", "exec", check_name(namespace), *argv]


def ip_argv(namespace: str | None, *args: str) -> list[str]:
    """An ``ip`` command acting on ``namespace`` (the current one for ``None``)."""
    if namespace is None:
        return ["ip", *args]
    return ["ip", "-n", check_name(namespace), *args]


async def create(name: str, *, loopback_up: bool = True) -> None:
    """Create namespace ``name``; NamespaceError if it exists.

    With ``loopback_up=False`` the caller brings ``lo`` up itself (in its own
    ``ip -batch``, saving a process on a path where milliseconds count).
    """
    if exists(name):
        raise NamespaceError("already exists", namespace=name)
    await run(["ip", "netns", "add", name])
    if loopback_up:
        await run(ip_argv(name, "link", "set", "lo", "up"))


async def delete(name: str) -> None:
    """Delete namespace ``name`` if it exists (its interfaces go with it).

    Interfaces die with the namespace only once no process is left inside;
    a process still running there keeps them alive but nameless.
    """
    if exists(name):
        await run(["ip", "netns", "delete", name], check=False)


async def set_sysctl(namespace: str | None, key: str, value: str) -> None:
    """Set a per-namespace sysctl such as ``net.ipv4.ip_forward``."""
    await run(netns_exec_argv(namespace, ["sysctl", "-q", "-w", f"{key}={value}"]))


async def get_sysctl(namespace: str | None, key: str) -> str:
    """Read a per-namespace sysctl (this namespace's straight from ``/proc/sys``)."""
    if namespace is None:
        return _read_own_sysctl(key)
    return (await run(netns_exec_argv(namespace, ["sysctl", "-n", key]))).strip()


def _read_own_sysctl(key: str) -> str:
    # procfs answers from memory: no need to leave the loop's thread.
    try:
        return Path("/proc/sys", *key.split(".")).read_text().strip()
    except OSError as exc:
        raise NetConfigError(f"cannot read sysctl {key}: {exc}") from exc


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _socket_in_thread(namespace: str, family: int, type_: int) -> socket.socket:
    with open("/proc/thread-self/ns/net", "rb") as home, open(netns_path(namespace), "rb") as there:
        _setns(there.fileno())
        try:
            return socket.socket(family, type_)
        finally:
            _setns(home.fileno())


async def socket_in_netns(
    namespace: str | None, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new non-blocking socket living in ``namespace`` (the current one for ``None``)."""
    if namespace is None:
        sock = socket.socket(family, type_)
        sock.setblocking(False)
        return sock
    if not exists(namespace):
        raise NamespaceError("does not exist", namespace=namespace)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(sock: socket.socket | None, exc: BaseException | None) -> None:
        if done.cancelled():
            if sock is not None:
                sock.close()
        elif exc is not None:
            done.set_exception(exc)
        else:
            assert sock is not None
            done.set_result(sock)

    def worker() -> None:
        try:
            sock = _socket_in_thread(namespace, family, type_)
        except OSError as exc:
            err = NamespaceError(f"cannot open a socket inside: {exc}", namespace=namespace)
            err.__cause__ = exc
            loop.call_soon_threadsafe(deliver, None, err)
        else:
            loop.call_soon_threadsafe(deliver, sock, None)

    threading.Thread(target=worker, name=f"setns-{namespace}", daemon=True).start()
    sock = await done
    sock.setblocking(False)
    return sock
