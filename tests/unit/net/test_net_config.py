"""Names, rulesets, records and argv builders: everything that needs no namespace."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.net import (
    NamespaceGuest,
    NetConfigError,
    NetError,
    PortForward,
    Proto,
    TapAttachment,
    VMNetwork,
    netns_exec_argv,
    nft,
)
from ferry.net.links import check_ifname
from ferry.net.netns import check_name
from ferry.net.state import OwnerRecord, RunDir, process_start_time
from ferry.net.vmnet import check_vm_id, host_link_name


def test_vm_ids_and_names() -> None:
    assert check_vm_id("vm-1") == "vm-1"
    for bad in ("", "VM", "a_b", "-x", "x" * 41, "a/b"):
        with pytest.raises(NetConfigError):
            check_vm_id(bad)
    assert nft.table_name("vm-1") == "ferry_vm_1"
    assert host_link_name(16383) == "ferry-v16383"
    assert len(host_link_name(16383)) <= 15
    with pytest.raises(NetConfigError):
        check_ifname("x" * 16)
    with pytest.raises(NetConfigError):
        check_name("../etc")


def test_netns_exec_argv() -> None:
    assert netns_exec_argv("ferry-vm-a", ["qemu", "-m", "64"]) == [
        "ip", "netns", "exec", "ferry-vm-a", "qemu", "-m", "64"]
    assert netns_exec_argv(None, ["true"]) == ["true"]


def test_qemu_and_guest_args(tmp_path: Path) -> None:
    net = VMNetwork("vm1", run_dir=tmp_path)
    assert net.namespace == "ferry-vm-vm1"
    assert net.qemu_netdev_args(device="virtio-net-pci", netdev_id="n0") == [
        "-netdev", "tap,id=n0,ifname=ferry-tap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]
    assert net.guest_kernel_args() == "ferry.ip=10.0.2.15/24 ferry.gw=10.0.2.2"
    assert net.guest_namespace is None
    with pytest.raises(NetError, match="not up"):
        _ = net.link_network
    test_net = VMNetwork("vm1", attachment=NamespaceGuest(), run_dir=tmp_path)
    assert test_net.guest_namespace == "ferry-guest-vm1"
    with pytest.raises(NetConfigError, match="no tap"):
        _ = test_net.tap_name


def test_duplicate_forward_refused(tmp_path: Path) -> None:
    f = PortForward("127.0.0.1", 1000, 80)
    with pytest.raises(NetConfigError, match="duplicate"):
        VMNetwork("vm1", [f, PortForward("127.0.0.1", 1000, 81)], run_dir=tmp_path)
    # Same port, other protocol: fine.
    VMNetwork("vm1", [f, PortForward("127.0.0.1", 1000, 80, proto=Proto.UDP)], run_dir=tmp_path)


def test_rulesets(tmp_path: Path) -> None:
    forwards = [PortForward("127.0.0.1", 1, 6379), PortForward("127.0.0.2", 2, 6379),
                PortForward("127.0.0.1", 3, 53, proto=Proto.UDP)]
    net = VMNetwork("vm-x", forwards, run_dir=tmp_path,
                    link_pool=ipaddress.IPv4Network("172.31.0.0/24"))
    net.slot = 3
    assert str(net.link_network) == "172.31.0.12/30"
    assert (net.parent_link_ip, net.vm_link_ip) == ("172.31.0.13", "172.31.0.14")
    vm_rules = net._vm_ruleset()
    assert vm_rules.startswith("table ip ferry_vm_x {")
    # One DNAT per (protocol, guest port), however many host addresses map to it.
    assert vm_rules.count("tcp dport 6379 dnat to 10.0.2.15:6379") == 1
    assert "udp dport 53 dnat to 10.0.2.15:53" in vm_rules
    assert 'ip saddr 10.0.2.0/24 oifname "ferry-up0" masquerade' in vm_rules
    parent = net._parent_ruleset()
    assert 'ip saddr 172.31.0.12/30 oifname != "ferry-v3" masquerade' in parent
    assert 'oifname "ferry-v3" drop' in parent

    closed = VMNetwork("vm-y", run_dir=tmp_path, outbound=False)
    closed.slot = 0
    assert "masquerade" not in closed._vm_ruleset()
    assert "masquerade" not in closed._parent_ruleset()
    assert 'iifname "ferry-v0" drop' in closed._parent_ruleset()


def test_tiny_link_pool_refused(tmp_path: Path) -> None:
    with pytest.raises(NetConfigError):
        VMNetwork("vm1", run_dir=tmp_path, link_pool=ipaddress.IPv4Network("10.9.9.0/31"))


def test_tap_attachment_is_default(tmp_path: Path) -> None:
    assert isinstance(VMNetwork("vm1", run_dir=tmp_path).attachment, TapAttachment)


# Records ------------------------------------------------------------------------------


def test_record_round_trip_and_run_dir(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    assert rd.records() == []
    rec = OwnerRecord.for_current_process(
        "vm-a", "vm", namespaces=("ferry-vm-a",), links=(("ferry-host-b", "ferry-v1"),),
        tables=(nft.TableRef(None, "ip", "ferry_a"),), parent="ferry-host-b", slot=1)
    assert OwnerRecord.from_json(rec.to_json()) == rec
    rd.write(rec)
    (rd.path / "garbage.json").write_text("{not json")
    assert rd.records() == [rec]
    assert rec.owner_alive()
    rd.remove("vm-a")
    rd.remove("vm-a")  # idempotent
    assert [r.key for r in rd.records()] == []


def test_dead_and_recycled_owners() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = OwnerRecord("k", "vm", owner_pid=proc.pid, owner_start=1)
    assert not dead.owner_alive()
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    # Same pid, different start time: a recycled pid, so the owner is gone.
    assert not OwnerRecord("k", "vm", owner_pid=me, owner_start=start + 1).owner_alive()
    assert OwnerRecord("k", "vm", owner_pid=me, owner_start=start).owner_alive()
