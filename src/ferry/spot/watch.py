"""The watchers' I/O: each provider's sans-IO core driven over HTTP with httpx.

:class:`SpotWatcher` asks its core for the next request, makes it, hands the answer
back, and passes each new notice to ``on_notice`` -- once per event (:class:`NoticeGate`),
and at most :data:`MAX_NOTICES` times in a watcher's life, whatever the service says. A
failed request (no answer, or an answer the core refuses) is counted, reported to
``on_error`` and retried after a jittered exponential backoff; it never ends the watch.
``auto`` (:func:`detect`) asks all three services at once and takes the one that answers
as its provider would.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

import httpx

from ferry.errors import ConfigError
from ferry.spot.aws import AwsCore
from ferry.spot.azure import AzureCore
from ferry.spot.errors import (
    MetadataResponseError,
    MetadataUnreachableError,
    NoMetadataServiceError,
    SpotError,
    snippet,
)
from ferry.spot.gcp import GcpCore
from ferry.spot.messages import Request, Response
from ferry.spot.notice import Notice, Provider

log = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254"
"""The link-local address all three providers serve their metadata on."""
CONNECT_TIMEOUT_S = 2.0
"""The service is on the local host's link: it answers at once or not at all."""
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 5.0
"""A GCP or Azure window is 30 s: a retry never waits longer than a sixth of it."""
MAX_NOTICES = 16
"""Notices one watcher hands on in its life. A node is evacuated once; a few more
(another event with an earlier deadline) are worth passing on, a storm is not."""
MAX_KEYS = 1024
PROBE_TIMEOUT_S = 3.0


class ProviderCore(Protocol):
    """A provider's sans-IO conversation (:mod:`ferry.spot.aws`, ``.gcp``, ``.azure``)."""

    @property
    def provider(self) -> Provider: ...

    def next_request(self, now: dt.datetime) -> Request: ...

    def receive(self, request: Request, response: Response, now: dt.datetime
                ) -> list[Notice]: ...

    def wait_s(self) -> float: ...

    def failed(self) -> None: ...

    def acknowledge(self, notice: Notice) -> Request | None: ...


def core_for(provider: Provider, *, vm_name: str | None = None,
             poll_interval_s: float | None = None) -> ProviderCore:
    """A fresh core for ``provider`` (``poll_interval_s`` for AWS and Azure)."""
    match provider:
        case Provider.AWS:
            return AwsCore() if poll_interval_s is None else AwsCore(
                poll_interval_s=poll_interval_s)
        case Provider.GCP:
            return GcpCore()
        case Provider.AZURE:
            return AzureCore(vm_name=vm_name) if poll_interval_s is None else AzureCore(
                vm_name=vm_name, poll_interval_s=poll_interval_s)
    raise ConfigError(f"unknown provider {provider!r}")


class NoticeGate:
    """Admits each event's notice once, and at most ``limit`` notices in all."""

    def __init__(self, limit: int = MAX_NOTICES) -> None:
        self.limit = limit
        self.admitted = 0
        self.refused = 0
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def admit(self, notice: Notice) -> bool:
        key = f"{notice.provider}:{notice.key}"
        if key in self._seen:
            return False
        self._seen[key] = None
        while len(self._seen) > MAX_KEYS:
            self._seen.popitem(last=False)
        if self.admitted >= self.limit:
            self.refused += 1
            if self.refused == 1:
                log.warning("%s: %d notices already passed on; ignoring further events",
                            notice.provider, self.limit)
            return False
        self.admitted += 1
        return True


class Backoff:
    """Jittered exponential delays ("full jitter"), reset by a success."""

    def __init__(self, initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S,
                 rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_s(self) -> float:
        cap = min(self.max_s, self.initial_s * 2 ** self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self._attempt = 0


@dataclasses.dataclass(slots=True)
class WatchStats:
    """What a watcher did, for metrics and status lines."""

    requests: int = 0
    errors: int = 0
    notices: int = 0
    last_error: str | None = None


def client(base_url: str = METADATA_URL) -> httpx.AsyncClient:
    """An HTTP client for the metadata service: never through a proxy (``trust_env``
    off: ``HTTP_PROXY`` must not capture 169.254.169.254), no redirects, no compression."""
    return httpx.AsyncClient(base_url=base_url, trust_env=False, follow_redirects=False,
                             timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
                             headers={"Accept-Encoding": "identity"})


async def exchange(http: httpx.AsyncClient, request: Request, provider: Provider) -> Response:
    """Make ``request``; its body read up to ``request.max_body_bytes``, else refused.

    httpx's errors become ours here: no answer is MetadataUnreachableError, a broken
    answer (bad HTTP, too long) MetadataResponseError."""
    p = provider.value
    started = time.monotonic()
    try:
        async with asyncio.timeout(request.timeout_s):
            async with http.stream(request.method, request.path, headers=dict(request.headers),
                                   content=request.body or None) as r:
                length = r.headers.get("content-length")
                if length is not None and (not length.isdigit()
                                           or int(length) > request.max_body_bytes):
                    raise MetadataResponseError(
                        f"{request.path}: body of {snippet(length)} bytes "
                        f"(at most {request.max_body_bytes})", provider=p)
                body = bytearray()
                async for chunk in r.aiter_raw():
                    body += chunk
                    if len(body) > request.max_body_bytes:
                        raise MetadataResponseError(
                            f"{request.path}: body longer than {request.max_body_bytes} bytes",
                            provider=p)
                headers = {k.lower(): v for k, v in r.headers.items()}
                return Response(r.status_code, headers, bytes(body),
                                elapsed_s=time.monotonic() - started)
    except TimeoutError:
        raise MetadataUnreachableError(f"{request.path}: no answer in {request.timeout_s:.0f} s",
                                       provider=p) from None
    except httpx.ProtocolError as exc:  # the service spoke broken HTTP
        raise MetadataResponseError(f"{request.path}: bad HTTP: {exc}", provider=p) from exc
    except httpx.TransportError as exc:
        raise MetadataUnreachableError(f"{request.path}: {type(exc).__name__}: {exc}",
                                       provider=p) from exc
    except httpx.HTTPError as exc:
        raise MetadataResponseError(f"{request.path}: {exc}", provider=p) from exc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class SpotWatcher:
    """Watches one provider's metadata service until cancelled."""

    def __init__(self, core: ProviderCore, *, base_url: str = METADATA_URL,
                 gate: NoticeGate | None = None, backoff: Backoff | None = None) -> None:
        self.core = core
        self.base_url = base_url
        self.gate = gate or NoticeGate()
        self.backoff = backoff or Backoff()
        self.stats = WatchStats()
        self._http: httpx.AsyncClient | None = None
        self.log = log.getChild(core.provider.value)

    @property
    def provider(self) -> Provider:
        return self.core.provider

    async def run(self, on_notice: Callable[[Notice], None],
                  on_error: Callable[[SpotError], None] = lambda e: None) -> None:
        """Watch until cancelled: ``on_notice`` once per new event, ``on_error`` per failed
        request (each is retried). Neither callback may block the loop; what one raises
        ends the watch (hand slow work to a task)."""
        async with client(self.base_url) as http:
            self._http = http
            try:
                await self._loop(http, on_notice, on_error)
            finally:
                self._http = None

    async def _loop(self, http: httpx.AsyncClient, on_notice: Callable[[Notice], None],
                    on_error: Callable[[SpotError], None]) -> None:
        failing = False
        while True:
            request = self.core.next_request(_now())
            self.stats.requests += 1
            try:
                response = await exchange(http, request, self.provider)
                notices = self.core.receive(request, response, _now())
            except SpotError as exc:
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                # The first failure of a run is a warning; the rest, until one succeeds,
                # are debug lines: a dead service does not flood the log.
                self.log.log(logging.DEBUG if failing else logging.WARNING, "%s", exc)
                failing = True
                self.core.failed()
                on_error(exc)
                await asyncio.sleep(self.backoff.next_s())
                continue
            if failing:
                self.log.info("metadata service answers again")
                failing = False
            self.backoff.reset()
            for notice in notices:
                if self.gate.admit(notice):
                    self.stats.notices += 1
                    self.log.info("notice: %s at %s (%.0f s left)", notice.action,
                                     notice.deadline.isoformat(), notice.seconds_left())
                    on_notice(notice)
            await asyncio.sleep(self.core.wait_s())

    async def acknowledge(self, notice: Notice) -> None:
        """Tell the provider to go ahead (Azure's StartRequests; nothing for AWS or GCP).

        Only once the node is empty: Azure may act at once."""
        request = self.core.acknowledge(notice)
        if request is None:
            return
        if self._http is not None:
            response = await exchange(self._http, request, self.provider)
        else:
            async with client(self.base_url) as http:
                response = await exchange(http, request, self.provider)
        self.core.receive(request, response, _now())


async def _answers(provider: Provider, base_url: str, timeout_s: float) -> bool:
    core = core_for(provider)
    request = core.next_request(_now())
    request = dataclasses.replace(request, timeout_s=min(request.timeout_s, timeout_s))
    try:
        async with client(base_url) as http:
            core.receive(request, await exchange(http, request, provider), _now())
    except SpotError as exc:
        log.debug("probe: %s", exc)
        return False
    return True


async def detect(base_url: str = METADATA_URL, *, timeout_s: float = PROBE_TIMEOUT_S
                 ) -> Provider:
    """The provider whose metadata service answers at ``base_url``: each is asked its own
    first question at once; exactly one must answer it."""
    async with asyncio.TaskGroup() as tg:
        tasks = {p: tg.create_task(_answers(p, base_url, timeout_s)) for p in Provider}
    found = [p for p, t in tasks.items() if t.result()]
    if not found:
        raise NoMetadataServiceError(f"no metadata service of {', '.join(Provider)} "
                                     f"answers at {base_url}")
    if len(found) > 1:
        raise NoMetadataServiceError(f"several metadata services answer at {base_url}: "
                                     f"{', '.join(found)}; name one with --provider")
    return found[0]


async def watcher_for(provider: Provider | str, *, base_url: str = METADATA_URL,
                      vm_name: str | None = None,
                      poll_interval_s: float | None = None) -> SpotWatcher:
    """A watcher for ``provider`` (``"auto"``: the one :func:`detect` finds)."""
    if provider == "auto":
        provider = await detect(base_url)
    try:
        provider = Provider(provider)
    except ValueError:
        raise ConfigError(f"unknown provider {provider!r}: aws, gcp, azure or auto") from None
    return SpotWatcher(core_for(provider, vm_name=vm_name, poll_interval_s=poll_interval_s),
                       base_url=base_url)
