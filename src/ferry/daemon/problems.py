"""Errors as RFC 9457 problem details: ``application/problem+json``, never a traceback.

A body looks like::

    {"type": "https://ferry.dev/problems/vm-not-found", "title": "VM not found",
     "status": 404, "detail": "vm r9: no such VM on this host", "kind": "VMNotFoundError"}

``kind`` is the ferry error class (what the CLI maps to its exit codes). Request
bodies that do not validate (malformed JSON, unknown fields, wrong types or sizes)
are 400/413/422 problems listing what was wrong.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferry.cluster.errors import ClusterUnavailableError
from ferry.errors import (
    AuthenticationError,
    BrokenResourceError,
    ConfigError,
    FerryError,
    IntegrityError,
    PeerError,
    RemoteProtocolError,
)
from ferry.package.errors import PackageError
from ferry.vm.errors import VMExistsError, VMNotFoundError
from ferry.vm.pkgcache import PackageInUseError
from ferry.vm.volumes import VolumeError

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://ferry.dev/problems/"


class Problem(Exception):
    """Raise in a route to answer with a problem (status, a slug for ``type``, a title)."""

    def __init__(self, status: int, slug: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.extra = extra


def problem_response(status: int, slug: str, title: str, detail: str,
                     **extra: Any) -> JSONResponse:
    body = {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail,
            **extra}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE)


def for_error(exc: FerryError) -> Problem:
    """The problem a ferry error answers with."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    kind = type(exc).__name__
    if isinstance(exc, VMNotFoundError):
        return Problem(404, "vm-not-found", "VM not found", detail, kind=kind)
    if isinstance(exc, VolumeError):
        missing = "no volume" in detail
        return Problem(404 if missing else 409, "volume-not-found" if missing
                       else "volume-conflict", "Volume not found" if missing
                       else "Volume conflict", detail, kind=kind)
    if isinstance(exc, VMExistsError):
        return Problem(409, "vm-exists", "VM exists", detail, kind=kind)
    if isinstance(exc, PackageInUseError):
        return Problem(409, "package-in-use", "Package in use", detail, kind=kind)
    if isinstance(exc, PackageError):
        return Problem(422, "package-rejected", "Package rejected", detail, kind=kind)
    if isinstance(exc, ConfigError):
        return Problem(400, "bad-request", "Bad request", detail, kind=kind)
    if isinstance(exc, ClusterUnavailableError):
        return Problem(503, "cluster-unavailable", "etcd unreachable", detail, kind=kind)
    if isinstance(exc, IntegrityError):
        return Problem(502, "integrity", "Integrity check failed", detail, kind=kind)
    if isinstance(exc, PeerError | BrokenResourceError | AuthenticationError
                  | RemoteProtocolError):
        return Problem(502, "peer", "The peer failed or refused", detail, kind=kind)
    return Problem(500, "failed", "Operation failed", detail, kind=kind)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` with a problem body."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.slug, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(FerryError)
    async def _ferry(request: Request, exc: FerryError) -> JSONResponse:
        p = for_error(exc)
        return problem_response(p.status, p.slug, p.title, p.detail, **p.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(part) for part in e.get("loc", ())],
                   "msg": str(e.get("msg", ""))[:300]} for e in exc.errors()[:20]]
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        if malformed:
            return problem_response(400, "malformed-json", "Malformed JSON",
                                    "the request body is not valid JSON", errors=errors)
        return problem_response(422, "invalid-request", "Invalid request",
                                "the request does not match the API", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized",
                413: "too-large"}.get(exc.status_code, "http-error")
        return problem_response(exc.status_code, slug, str(exc.detail), str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return problem_response(500, "internal", "Internal error",
                                f"{type(exc).__name__} (logged by the daemon)")
