"""``ferry package add``: a verified package lands in this host's package cache, once.

That cache is where an arriving VM's destination looks for the bases of its
devices (:mod:`ferry.vm.overlays`); a package that fails verification
leaves nothing there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.cli.exitcodes import ExitCode
from ferry.cli.main import main
from ferry.testing.live import sample_manifest
from ferry.vm.pkgcache import find_cached


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var, sub in (("FERRY_RUN_DIR", "run"), ("FERRY_STATE_DIR", "state"),
                     ("FERRY_CACHE_DIR", "cache"), ("FERRY_PACKAGE_CACHE_DIR", "pkgcache"),
                     ("FERRY_TRUST_DIR", "trust"), ("FERRY_SIGNING_KEY", "key/signing.key")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    assert main(["key", "create", "--trust"]) == ExitCode.OK
    src = tmp_path / "src"
    (src / "disks").mkdir(parents=True)
    (src / "manifest.json").write_text(json.dumps(sample_manifest().to_json()))
    (src / "disks" / "root.img").write_bytes(b"\1" * 4096)
    assert main(["package", "create", str(src), str(tmp_path / "vm.ferry")]) == ExitCode.OK
    return tmp_path


def test_a_package_is_added_once(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["package", "add", str(host / "vm.ferry"), "--json"]) == ExitCode.OK
    first = json.loads(capsys.readouterr().out)
    assert first["already_cached"] is False
    cached = find_cached(host / "pkgcache", first["package_id"])
    assert cached is not None
    assert (cached.directory / "disks" / "root.img").read_bytes() == b"\1" * 4096
    assert main(["package", "add", str(host / "vm.ferry"), "--json"]) == ExitCode.OK
    second = json.loads(capsys.readouterr().out)
    assert (second["already_cached"], second["package_id"]) == (True, first["package_id"])


def test_a_tampered_package_leaves_nothing_in_the_cache(host: Path) -> None:
    data = bytearray((host / "vm.ferry").read_bytes())
    data[-10] ^= 0xFF
    (host / "bad.ferry").write_bytes(bytes(data))
    assert main(["package", "add", str(host / "bad.ferry")]) != ExitCode.OK
    entries = [p for p in (host / "pkgcache").glob("*") if p.name != "index"]
    assert entries == []


def test_find_cached_ignores_an_entry_of_another_id(host: Path) -> None:
    assert main(["package", "add", str(host / "vm.ferry")]) == ExitCode.OK
    entry = next(p for p in (host / "pkgcache").iterdir() if p.name != "index")
    other = entry.name + "0" * 32  # same 32-digit prefix, another full id
    assert find_cached(host / "pkgcache", other) is None
    assert find_cached(host / "pkgcache", "f" * 64) is None


def test_the_cache_is_listed_and_an_unused_package_removed(
        host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["package", "add", str(host / "vm.ferry"), "--json"]) == ExitCode.OK
    added = json.loads(capsys.readouterr().out)
    assert main(["package", "ls", "--json"]) == ExitCode.OK
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["package_id"] == added["package_id"]
    assert listed["in_use"] is False
    assert listed["size_bytes"] >= 4096
    assert main(["package", "rm", "nothex!!", "--json"]) == ExitCode.USAGE
    assert main(["package", "rm", added["package_id"][:10], "--json"]) == ExitCode.OK
    removed = json.loads(capsys.readouterr().out)
    assert removed == {"package_ids": [added["package_id"]],
                       "freed_bytes": listed["size_bytes"]}
    assert find_cached(host / "pkgcache", added["package_id"]) is None
    # The index no longer names the entry: adding the file again extracts it again.
    assert main(["package", "add", str(host / "vm.ferry"), "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["already_cached"] is False


def test_prune_keeps_what_a_vm_uses(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ferry.vm.pkgcache import PackageInUseError, cached_packages, prune, remove_cached

    assert main(["package", "add", str(host / "vm.ferry"), "--json"]) == ExitCode.OK
    [package] = cached_packages(host / "pkgcache")
    with pytest.raises(PackageInUseError, match="used by a VM"):
        remove_cached(host / "pkgcache", package, {package.directory})
    assert prune(host / "pkgcache", {package.directory}) == []
    assert package.directory.is_dir()
    [(gone, size)] = prune(host / "pkgcache", set())
    assert (gone.package_id, size > 0) == (package.package_id, True)
    assert cached_packages(host / "pkgcache") == []
    capsys.readouterr()
    assert main(["package", "prune", "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out) == {"package_ids": [], "freed_bytes": 0}
