"""Fetch and unpack Debian packages without installing them on the host.

``apt-get download`` fetches a .deb from the host's configured mirrors and
``dpkg-deb -x`` unpacks it into a directory; nothing runs as a maintainer
script and nothing lands in the host's dpkg database. Unpacked packages are
cached under ``<cache>/debs/<name>_<version>/`` and keyed by version, so a
second fetch of the same version is a directory lookup.
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferry.guest.image.cache import building
from ferry.guest.image.errors import PackageError

log = logging.getLogger(__name__)

# Debian package names: lowercase alphanumerics and + - . (Policy 5.6.1).
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_DEP_RE = re.compile(r"^\s+\|?(Pre)?Depends: (\S+)$")


@dataclass(frozen=True, slots=True)
class UnpackedPackage:
    """A .deb unpacked into ``root`` (its files as they would be under ``/``)."""

    name: str
    version: str
    root: Path
    cache_hit: bool


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid Debian package name, else raise."""
    if not _NAME_RE.match(name):
        raise PackageError("not a valid Debian package name", package=name)
    return name


def _run(argv: list[str], *, package: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise PackageError(f"cannot run {argv[0]}: {exc}", package=package) from exc
    if proc.returncode != 0:
        raise PackageError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}",
            package=package,
        )
    return proc.stdout


@functools.lru_cache(maxsize=256)
def candidate_version(name: str) -> str:
    """The version ``apt-get download`` would fetch for ``name``.

    Memoised for the life of the process: apt-cache takes about 0.5 s a call
    and the package lists only change on ``apt-get update``.
    """
    out = _run(["apt-cache", "policy", validate_name(name)], package=name)
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate":
            version = value.strip()
            if version and version != "(none)":
                return version
    raise PackageError("no installable candidate (run apt-get update?)", package=name)


def direct_depends(name: str) -> tuple[str, ...]:
    """Names of the packages ``name`` Depends/Pre-Depends on (first of each alternative).

    Virtual packages (``<perl:any>``) are skipped: they never provide
    shared libraries we need, and resolving them needs the full dpkg logic.
    """
    return direct_depends_many([name])[name]


_depends_memo: dict[str, tuple[str, ...]] = {}


def direct_depends_many(names: list[str]) -> dict[str, tuple[str, ...]]:
    """:func:`direct_depends` of several packages with one ``apt-cache`` run (memoised)."""
    todo = [validate_name(n) for n in dict.fromkeys(names) if n not in _depends_memo]
    if todo:
        out = _run(
            ["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
             "--no-breaks", "--no-replaces", "--no-enhances", *todo],
            package=",".join(todo),
        )
        parsed: dict[str, list[str]] = {}
        current: list[str] | None = None
        alternative = False
        for line in out.splitlines():
            if line and not line[0].isspace():
                current = parsed.setdefault(line.strip().split(":", 1)[0], [])
                alternative = False
                continue
            m = _DEP_RE.match(line)
            if not m or current is None:
                continue
            dep = m.group(2).split(":", 1)[0]
            first_of_group = not alternative
            alternative = line.lstrip().startswith("|")
            if first_of_group and not dep.startswith("<") and dep not in current:
                current.append(dep)
        for n in todo:
            if n not in parsed:
                raise PackageError("apt-cache knows no such package", package=n)
            _depends_memo[n] = tuple(parsed[n])
    return {n: _depends_memo[n] for n in names}


def _entry(cache_dir: Path, name: str, version: str) -> Path:
    return cache_dir / "debs" / f"{name}_{version.replace(':', '%3a')}"


def candidate_versions(names: list[str]) -> dict[str, str]:
    """:func:`candidate_version` of several packages with one ``apt-cache`` run."""
    todo = [validate_name(n) for n in dict.fromkeys(names)]
    if len(todo) <= 1:
        return {n: candidate_version(n) for n in todo}
    out = _run(["apt-cache", "policy", *todo], package=",".join(todo))
    found: dict[str, str] = {}
    current: str | None = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1].split(":", 1)[0]
            continue
        key, _, value = line.strip().partition(":")
        if current and key == "Candidate" and value.strip() not in ("", "(none)"):
            found.setdefault(current, value.strip())
    for n in todo:
        if n not in found:
            raise PackageError("no installable candidate (run apt-get update?)", package=n)
    return found


def fetch_many(names: list[str], cache_dir: Path) -> list[UnpackedPackage]:
    """:func:`fetch` several packages; the missing ones are downloaded in one apt-get run.

    apt-get's start-up dominates fetching small library packages one by one.
    """
    versions = candidate_versions(names)
    missing = [n for n in versions if not (_entry(cache_dir, n, versions[n]) / "root").is_dir()]
    if len(missing) > 1:
        log.info("fetching Debian packages %s", " ".join(missing))
        (cache_dir / "debs").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir / "debs") as dl:
            _run(["apt-get", "download", "-q", *(f"{n}={versions[n]}" for n in missing)],
                 package=",".join(missing), cwd=Path(dl))
            for n in missing:
                debs = list(Path(dl).glob(f"{n}_*.deb"))
                if len(debs) != 1:
                    raise PackageError(f"apt-get download produced {len(debs)} files", package=n)
                with building(_entry(cache_dir, n, versions[n])) as scratch:
                    _run(["dpkg-deb", "-x", str(debs[0]), str(scratch / "root")], package=n)
    return [fetch(n, cache_dir, version=versions[n]) for n in versions]


def fetch(name: str, cache_dir: Path, *, version: str | None = None) -> UnpackedPackage:
    """Download and unpack ``name`` (at ``version``, default the candidate), cached."""
    validate_name(name)
    version = version or candidate_version(name)
    final = _entry(cache_dir, name, version)
    if (final / "root").is_dir():
        return UnpackedPackage(name, version, final / "root", cache_hit=True)
    log.info("fetching Debian package %s=%s", name, version)
    with building(final) as scratch, tempfile.TemporaryDirectory(dir=scratch) as dl:
        _run(["apt-get", "download", "-q", f"{name}={version}"], package=name, cwd=Path(dl))
        debs = list(Path(dl).glob("*.deb"))
        if len(debs) != 1:
            raise PackageError(f"apt-get download produced {len(debs)} files", package=name)
        _run(["dpkg-deb", "-x", str(debs[0]), str(scratch / "root")], package=name)
    return UnpackedPackage(name, version, final / "root", cache_hit=False)
