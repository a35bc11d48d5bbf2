"""The service address without root: its checks, the announcement frame, the rules."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from ferry.net import PortForward, Proto, VMNetwork
from ferry.net.errors import NetConfigError
from ferry.net.service import check_service_address, garp_frame

MAC = bytes.fromhex("020000aabbcc")


def test_garp_frame_is_a_broadcast_arp_request_for_the_address_itself() -> None:
    frame = garp_frame(MAC, "10.77.0.231")
    assert len(frame) == 14 + 28
    dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    assert (dst, src, ethertype) == (b"\xff" * 6, MAC, 0x0806)
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s",
                                                                      frame[14:])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert sha == MAC
    assert spa == tpa == ipaddress.IPv4Address("10.77.0.231").packed  # sender = target
    assert tha == bytes(6)
    with pytest.raises(NetConfigError):
        garp_frame(MAC[:5], "10.77.0.231")


@pytest.mark.parametrize("bad", ["127.0.0.1", "0.0.0.0", "224.0.0.1", "169.254.1.1",
                                 "::1", "10.77.0", "host.example"])
def test_service_address_must_be_a_unicast_ipv4_literal(bad: str) -> None:
    with pytest.raises(NetConfigError):
        check_service_address(bad)
    assert check_service_address("10.77.0.231") == "10.77.0.231"


def test_a_service_address_serves_the_forwards_guest_ports(tmp_path: Path) -> None:
    with pytest.raises(NetConfigError):
        VMNetwork("vm-s", run_dir=tmp_path, service_address="10.77.0.231")  # no forwards
    forwards = [PortForward("127.0.0.1", 1, 6379), PortForward("10.0.0.1", 2, 6379),
                PortForward("127.0.0.1", 3, 7070, proto=Proto.UDP)]
    net = VMNetwork("vm-s", forwards, run_dir=tmp_path, service_address="10.77.0.231",
                    link_pool=ipaddress.IPv4Network("172.31.0.0/24"))
    net.slot = 1
    vm_rules = net._vm_ruleset()
    # In at the raw hook, untracked, to the guest; the guest's answers back out as the
    # service address, except those to the forwarders (the parent's veth end).
    assert "type filter hook prerouting priority raw" in vm_rules
    assert ('iifname "ferry-up0" ip daddr 10.77.0.231 tcp dport { 6379 } '
            "notrack ip daddr set 10.0.2.15") in vm_rules
    assert ('iifname "ferry-br0" ip saddr 10.0.2.15 ip daddr != 172.31.0.5 '
            "udp sport { 7070 } notrack ip saddr set 10.77.0.231") in vm_rules
    assert "ct state untracked accept" in vm_rules
    parent = net._parent_ruleset()
    accept = 'oifname "ferry-v1" ip daddr 10.77.0.231 tcp dport { 6379 } accept'
    assert accept in parent
    assert parent.index(accept) < parent.index('oifname "ferry-v1" drop')

    plain = VMNetwork("vm-p", forwards, run_dir=tmp_path)
    plain.slot = 2
    assert "notrack" not in plain._vm_ruleset()
    assert "untracked" not in plain._vm_ruleset()
