"""``/v1/packages``: the host's package cache (verified packages, by id)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from ferry.daemon import models as m
from ferry.daemon.problems import Problem
from ferry.daemon.state import Daemon
from ferry.guest.image import build_blueprint
from ferry.package import TrustStore
from ferry.package import verify_package as verify_package_file
from ferry.vm import pkgcache


def package_view(p: pkgcache.OpenedPackage, in_use: set[Path] | None = None) -> m.Package:
    return m.Package(package_id=p.package_id, name=p.manifest.name, directory=str(p.directory),
                     memory_mib=p.manifest.machine.memory_mib,
                     disks=[e.name for e in p.manifest.disks],
                     size_bytes=pkgcache.entry_bytes(p),
                     in_use=None if in_use is None else p.directory in in_use)


def _find(d: Daemon, package_id: str) -> pkgcache.OpenedPackage:
    """The cached package whose id starts with ``package_id`` (at least 8 hex digits)."""
    if not (8 <= len(package_id) <= 64) or any(c not in "0123456789abcdef" for c in package_id):
        raise Problem(422, "invalid", "Invalid request",
                      "a package id is 8 to 64 lowercase hex digits")
    found = [p for p in pkgcache.cached_packages(d.host.package_cache)
             if p.package_id.startswith(package_id)]
    if len(found) != 1:
        raise Problem(404 if not found else 409, "package-not-found" if not found
                      else "package-ambiguous", "Package not found" if not found
                      else "Package id ambiguous",
                      f"{len(found)} cached packages have an id starting {package_id}")
    return found[0]


def routes(d: Daemon) -> APIRouter:
    r = APIRouter()

    def listing() -> list[m.Package]:
        in_use = d.packages_in_use()
        return [package_view(p, in_use)
                for p in pkgcache.cached_packages(d.host.package_cache)]

    @r.get("/v1/packages", response_model=list[m.Package], tags=["packages"])
    async def list_packages() -> list[m.Package]:
        """The cache, with each entry's disk use and whether a VM here runs on it."""
        return await asyncio.to_thread(listing)

    @r.post("/v1/packages", response_model=m.Package, tags=["packages"])
    async def add_package(body: m.AddPackage) -> m.Package:
        """Verify a package file against this host's trust list into the cache."""
        file = Path(body.file)
        if not await asyncio.to_thread(file.is_file):
            raise Problem(400, "bad-request", "Bad request", f"no package file {file}")
        opened = await asyncio.to_thread(pkgcache.open_package, file,
                                         TrustStore.for_host(d.host),
                                         cache_dir=d.host.package_cache)
        return package_view(opened)

    @r.post("/v1/packages/verify", response_model=m.Verified, tags=["packages"])
    async def verify_package(body: m.AddPackage) -> m.Verified:
        """Verify a package file completely against this host's trust list, writing
        nothing (as ``ferry package verify``); a bad package is ``422``."""
        file = Path(body.file)
        if not await asyncio.to_thread(file.is_file):
            raise Problem(400, "bad-request", "Bad request", f"no package file {file}")
        info = await asyncio.to_thread(verify_package_file, file,
                                       TrustStore.for_host(d.host))
        return m.Verified(file=str(file), name=str(info.manifest.get("name", "")),
                          key_id=info.key_id, package_id=info.header_sha256 or "")

    @r.post("/v1/images", status_code=202, response_model=m.Operation, tags=["images"])
    async def build_image(body: m.BuildImage) -> m.Operation:
        """Build (or find in the image cache) a blueprint's kernel, initramfs and root disk,
        as ``ferry vm build``: an operation (a first build downloads and unpacks Debian
        packages)."""
        blueprint = body.blueprint
        if "/" in blueprint and not (blueprint.startswith("/") and blueprint.endswith(".toml")):
            raise Problem(422, "invalid", "Invalid request",
                          "blueprint: a shipped name, or an absolute path to a .toml file")

        async def work(op_id: str) -> dict[str, Any]:
            img = await asyncio.to_thread(build_blueprint, blueprint,
                                          cache_dir=d.host.cache_root)
            return {"blueprint": img.blueprint.name, "kernel": str(img.kernel),
                    "initramfs": str(img.initramfs), "rootfs": str(img.rootfs),
                    "key": img.key, "cache_hit": img.cache_hit}

        return d.ops.start("build", None, work)

    @r.delete("/v1/packages/{package_id}", response_model=m.Removed, tags=["packages"])
    async def remove_package(package_id: str) -> m.Removed:
        """Remove a cached package; ``409`` while a VM here runs on it (or is suspended
        on it)."""
        def remove() -> m.Removed:
            p = _find(d, package_id)
            size = pkgcache.entry_bytes(p)
            pkgcache.remove_cached(d.host.package_cache, p, d.packages_in_use())
            return m.Removed(package_ids=[p.package_id], freed_bytes=size)

        async with d.cache_lock:
            return await asyncio.to_thread(remove)

    @r.post("/v1/packages/prune", response_model=m.Removed, tags=["packages"])
    async def prune_packages() -> m.Removed:
        """Remove every cached package no VM here uses."""
        async with d.cache_lock:
            removed = await asyncio.to_thread(pkgcache.prune, d.host.package_cache,
                                              d.packages_in_use())
        return m.Removed(package_ids=[p.package_id for p, _ in removed],
                         freed_bytes=sum(n for _, n in removed))

    return r
