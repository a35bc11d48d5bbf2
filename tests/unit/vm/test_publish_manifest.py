"""--publish parsing and the VM manifest's validation (no QEMU needed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ferry.net import Proto, WildcardAddressError
from ferry.testing.live import sample_manifest
from ferry.vm.errors import ManifestError, VMSpecError
from ferry.vm.manifest import (
    AgentSettings,
    DeviceEntry,
    VMManifest,
)
from ferry.vm.publish import parse_publish
from ferry.vm.registry import check_vm_id


@pytest.mark.parametrize(("spec", "expected"), [
    ("16379:6379", ("127.0.0.1", 16379, 6379, Proto.TCP)),
    ("127.0.0.1:16379:6379/tcp", ("127.0.0.1", 16379, 6379, Proto.TCP)),
    ("10.1.2.3:53:53/udp", ("10.1.2.3", 53, 53, Proto.UDP)),
    ("[::1]:8080:80", ("::1", 8080, 80, Proto.TCP)),
    ("0:80", ("127.0.0.1", 0, 80, Proto.TCP)),
])
def test_publish_specs(spec: str, expected: tuple[str, int, int, Proto]) -> None:
    f = parse_publish(spec)
    assert (f.host, f.host_port, f.guest_port, f.proto) == expected


@pytest.mark.parametrize("spec", ["6379", "a:1:2", "1:2/sctp", "1:2:3:4", "127.0.0.1:70000:1",
                                  "1:0", "localhost:1:2", ""])
def test_bad_publish_specs(spec: str) -> None:
    with pytest.raises(VMSpecError):
        parse_publish(spec)


def test_wildcard_needs_consent() -> None:
    for spec in ("0.0.0.0:80:80", "[::]:80:80"):
        with pytest.raises(WildcardAddressError):
            parse_publish(spec)
        assert parse_publish(spec, allow_wildcard=True).allow_wildcard


@pytest.mark.parametrize("vm_id", ["", "A", "-x", "a_b", "x" * 41, "a/b"])
def test_bad_vm_ids(vm_id: str) -> None:
    with pytest.raises(VMSpecError):
        check_vm_id(vm_id)


def _manifest(**changes: object) -> VMManifest:
    base = dataclasses.replace(sample_manifest(), agent=AgentSettings(True, ("sync",), ()),
                               readiness="true")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = _manifest()
    m.write(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert (data["format"], data["version"]) == ("ferry-vm", 1)
    assert VMManifest.load(tmp_path) == m


def test_manifest_validation(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="memory device"):
        _manifest(memory=DeviceEntry("memory", "memory", 128 << 20, 65536, "h"))
    with pytest.raises(ManifestError, match="relative"):
        _manifest(state="../state.bin")
    with pytest.raises(ManifestError, match="relative"):
        _manifest(kernel="/boot/vmlinuz")
    data = _manifest().to_json()
    for broken, match in (({**data, "format": "other"}, "not a ferry VM manifest"),
                          ({**data, "version": 2}, "unsupported manifest version"),
                          ({k: v for k, v in data.items() if k != "memory"}, "invalid"),
                          ([], "not a JSON object")):
        with pytest.raises(ManifestError, match=match):
            VMManifest.from_json(broken)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        VMManifest.load(tmp_path)
    with pytest.raises(ManifestError, match="cannot read"):
        VMManifest.load(tmp_path / "missing")
