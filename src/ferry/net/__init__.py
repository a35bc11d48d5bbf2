"""VM networking: per-VM network namespaces, tap devices, NAT and port forwards.

Each VM (its QEMU process) runs in its own namespace where the guest always
has the same address, MAC and gateway, so a snapshot resumes on any host
without renumbering. See docs/networking.md for the topology and design.

Public API::

    VMNetwork(vm_id, forwards, *, parent=None, outbound=True, attachment=None,
              run_dir=..., link_pool=..., clean_leftovers=True)   async context manager
    PortForward(host, host_port, guest_port, proto=Proto.TCP, allow_wildcard=False)
    TcpForwarder / UdpForwarder(forward, target, *, namespace=None): start()/stop()
    cleanup_leftovers(run_dir) -> list[str]
    netns_exec_argv(ns, argv) -> list[str]
"""

from ferry.net.errors import (
    AddressPoolExhaustedError,
    ForwardError,
    NamespaceError,
    NetCommandError,
    NetConfigError,
    NetError,
    WildcardAddressError,
)
from ferry.net.forward import PortForward, Proto, TcpForwarder, UdpForwarder, make_forwarder
from ferry.net.netns import netns_exec_argv, socket_in_netns
from ferry.net.state import DEFAULT_RUN_DIR, RunDir, cleanup_leftovers
from ferry.net.vmnet import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    GuestAttachment,
    GuestIdentity,
    NamespaceGuest,
    NetState,
    TapAttachment,
    VMNetwork,
)

__all__ = [
    "DEFAULT_RUN_DIR",
    "GATEWAY_IP",
    "GATEWAY_MAC",
    "GUEST_IP",
    "GUEST_MAC",
    "AddressPoolExhaustedError",
    "ForwardError",
    "GuestAttachment",
    "GuestIdentity",
    "NamespaceError",
    "NamespaceGuest",
    "NetCommandError",
    "NetConfigError",
    "NetError",
    "NetState",
    "PortForward",
    "Proto",
    "RunDir",
    "TapAttachment",
    "TcpForwarder",
    "UdpForwarder",
    "VMNetwork",
    "WildcardAddressError",
    "cleanup_leftovers",
    "make_forwarder",
    "netns_exec_argv",
    "socket_in_netns",
]
