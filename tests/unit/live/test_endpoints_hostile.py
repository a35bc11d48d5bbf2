"""``ferry vm receive --listen`` and ``ferry vm registry`` against hostile connections, in
process: unauthenticated, garbage and silent peers are dropped (and their sockets closed)
while the legitimate peer is served; refusals reach the destination as typed errors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.live import launch
from ferry.live.access import Access
from ferry.live.bootcache import BootCache
from ferry.live.errors import RefusedError
from ferry.live.pkgserve import serve_registry
from ferry.live.receive import open_link
from ferry.package import TrustStore
from ferry.testing.live import connect_raw, frame, sample_offer
from ferry.transport import auth
from ferry.transport.base import Stream

GARBAGE = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 4096,
           auth.MAGIC + os.urandom(auth.NONCE_BYTES + auth.PROOF_BYTES),  # a made-up proof
           frame(sample_offer())]                  # an offer without any token


def only_handshake(got: bytes) -> bool:
    """Nothing came back but the handshake: at most the server's challenge (a nonce and
    a proof of the token, no data) and the refusal byte."""
    if len(got) >= auth.CHALLENGE_BYTES:
        got = got[auth.CHALLENGE_BYTES:]
    return got in (b"", auth.REFUSED)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_receive_serves_the_peer_with_the_token_after_hostile_ones(tmp_path: Path) -> None:
    token = auth.new_token()
    bound: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    accepting = asyncio.create_task(open_link(Access(token=token), listen=("127.0.0.1", 0),
                                              on_listening=bound.set_result))
    host, port = await bound
    silent = await asyncio.open_connection(host, port)  # never says a word
    for data in GARBAGE:
        assert only_handshake(await connect_raw(host, port, data))
    assert not accepting.done()
    legit = await Access(token=token).connect(host, port)
    served = await accepting
    await legit.send_all(b"hello")
    assert await served.receive_some(5) == b"hello"
    for s in (served, legit):
        await s.aclose()
    silent[1].close()


async def test_receive_without_a_token_or_tls_needs_insecure() -> None:
    from ferry.errors import ConfigError

    with pytest.raises(ConfigError):
        Access()
    assert Access.listening(None).token is not None
    assert Access.listening(None, insecure=True).token is None


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[str, int, str]]:
    token = auth.new_token()
    (tmp_path / "pkgs").mkdir()
    bound: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_registry(
        tmp_path / "pkgs", "127.0.0.1", 0, trust=TrustStore.from_path(tmp_path / "t",
                                                                    missing_ok=True),
        cache_dir=tmp_path / "pkgcache", access=Access(token=token),
        on_listening=bound.set_result, max_unauthenticated=2,
        handshake_timeout_s=0.2))
    host, port = await bound
    try:
        yield host, port, token
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _start(host: str, port: int, token: str, package: str, tmp: Path) -> None:
    stream: Stream = await Access(token=token).connect(host, port)
    try:
        await launch.send_frame(stream, {"package": package})
        await launch.receive_offer(stream, BootCache(tmp / "cache"))
    finally:
        await stream.aclose()


async def test_registry_refusals_are_prompt_typed_and_close_the_socket(
        registry: tuple[str, int, str], tmp_path: Path) -> None:
    host, port, token = registry
    baseline = open_fds()
    for name in ("missing.ferry", "../../../etc/shadow", "a" * 5000):
        with pytest.raises(RefusedError):
            await _start(host, port, token, name, tmp_path)
    for data in GARBAGE:
        assert only_handshake(await connect_raw(host, port, data))
    await asyncio.sleep(0)  # let the server's tasks finish closing
    assert open_fds() <= baseline


async def test_registry_drops_silent_connections_and_still_serves(
        registry: tuple[str, int, str], tmp_path: Path) -> None:
    host, port, token = registry
    silent = [await asyncio.open_connection(host, port) for _ in range(5)]  # > vetting slots
    with pytest.raises(RefusedError):  # served (and refused: no such package) all the same
        await _start(host, port, token, "missing.ferry", tmp_path)
    for reader, writer in silent:
        assert only_handshake(await reader.read())  # dropped by the server
        writer.close()
