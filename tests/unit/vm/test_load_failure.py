"""A package saved by another QEMU version that fails to load says so (the real host QEMU's
version is read with ``qemu-system-x86_64 --version``)."""

from __future__ import annotations

import dataclasses

from ferry.qemu import DeviceStateError
from ferry.qemu.version import host_qemu_version
from ferry.testing.live import sample_manifest
from ferry.vm import runner
from ferry.vm.errors import VMLifecycleError
from ferry.vm.manifest import VMManifest


def _saved_by(version: str) -> VMManifest:
    m = sample_manifest()
    return dataclasses.replace(m, machine=dataclasses.replace(m.machine, qemu=version))


async def test_another_qemu_version_is_named() -> None:
    here = await host_qemu_version()
    assert here is not None
    assert here.count(".") == 2
    failed = DeviceStateError("load of migration failed", vm="r1")
    explained = await runner._explain_load_failure(failed, _saved_by("7.2.22"), "r1")
    assert isinstance(explained, VMLifecycleError)
    assert f"saved by QEMU 7.2.22 and this host runs QEMU {here}" in str(explained)
    # The same version, or a package that did not record one: the error as it was.
    assert await runner._explain_load_failure(failed, _saved_by(here), "r1") is failed
    assert await runner._explain_load_failure(failed, _saved_by(""), "r1") is failed


def test_old_manifests_without_a_qemu_version_still_load() -> None:
    data = sample_manifest().to_json()
    del data["machine"]["qemu"]
    assert VMManifest.from_json(data).machine.qemu == ""
