"""``--publish`` specs, like ``docker run -p``: ``[HOST:]HOST_PORT:GUEST_PORT[/tcp|/udp]``.

``HOST`` is a literal address (``127.0.0.1``, ``[::1]``); without one the
forward listens on 127.0.0.1 only (docker's default, every interface, is a
wildcard and must be asked for: ``0.0.0.0:8080:80`` with ``allow_wildcard``).
"""

from __future__ import annotations

import re

from ferry.net import NetConfigError, PortForward, Proto
from ferry.vm.errors import VMSpecError

DEFAULT_HOST = "127.0.0.1"
_SPEC_RE = re.compile(r"^(?:(?P<host>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?"
                      r"(?P<hport>\d{1,5}):(?P<gport>\d{1,5})(?:/(?P<proto>tcp|udp))?$")


def parse_publish(spec: str, *, allow_wildcard: bool = False) -> PortForward:
    """Parse one ``--publish`` spec; raises :class:`VMSpecError` (or WildcardAddressError)."""
    m = _SPEC_RE.match(spec.strip())
    if m is None:
        raise VMSpecError(f"bad publish spec {spec!r}: use [HOST:]HOST_PORT:GUEST_PORT[/tcp|/udp]")
    host = (m.group("host") or DEFAULT_HOST).strip("[]")
    try:
        return PortForward(host, int(m.group("hport")), int(m.group("gport")),
                           Proto(m.group("proto") or "tcp"), allow_wildcard=allow_wildcard)
    except NetConfigError as exc:
        if type(exc) is NetConfigError:
            raise VMSpecError(f"bad publish spec {spec!r}: {exc}") from exc
        raise
