"""The spot watchers' errors.

::

    FerryError
    └── SpotError                     a provider's metadata service could not be watched
        ├── MetadataResponseError     it answered something we refuse: malformed, oversized,
        │                             wrong types, a deadline in the past or far future (.provider)
        ├── MetadataUnreachableError  it did not answer: refused, reset, timed out (.provider)
        └── NoMetadataServiceError    ``auto``: no provider answered, or more than one did

Every message is one line (a hostile body never reaches a log line whole: :func:`snippet`).
"""

from __future__ import annotations

from ferry.errors import FerryError

SNIPPET_CHARS = 60
"""How much of a refused value a message quotes: enough to recognise it, never a flood."""


def snippet(value: object) -> str:
    """``value`` as a short one-line quotation for an error message."""
    text = repr(value)
    if len(text) > SNIPPET_CHARS:
        text = text[:SNIPPET_CHARS] + f"...({len(text)} chars)"
    return text


class SpotError(FerryError):
    """A provider's metadata service could not be watched."""

    def __init__(self, message: str, *, provider: str | None = None) -> None:
        message = " ".join(message.split())  # one line, whatever went in
        super().__init__(f"{provider}: {message}" if provider else message)
        self.provider = provider


class MetadataResponseError(SpotError):
    """The metadata service answered with something we refuse (its fault, or a hostile
    one's): bad status, oversized body, bad JSON, wrong types, impossible times."""


class MetadataUnreachableError(SpotError):
    """The metadata service did not answer (connection refused or reset, timeout)."""


class NoMetadataServiceError(SpotError):
    """``--provider auto`` found no metadata service, or more than one."""
