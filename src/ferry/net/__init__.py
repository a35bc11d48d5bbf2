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

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_exports(__name__, {
    "AddressPoolExhaustedError": "ferry.net.errors",
    "ForwardError": "ferry.net.errors",
    "NamespaceError": "ferry.net.errors",
    "NetCommandError": "ferry.net.errors",
    "NetConfigError": "ferry.net.errors",
    "NetError": "ferry.net.errors",
    "WildcardAddressError": "ferry.net.errors",
    "PortForward": "ferry.net.forward",
    "Proto": "ferry.net.forward",
    "TcpForwarder": "ferry.net.forward",
    "UdpForwarder": "ferry.net.forward",
    "make_forwarder": "ferry.net.forward",
    "netns_exec_argv": "ferry.net.netns",
    "socket_in_netns": "ferry.net.netns",
    "DEFAULT_RUN_DIR": "ferry.net.state",
    "RunDir": "ferry.net.state",
    "cleanup_leftovers": "ferry.net.state",
    "GATEWAY_IP": "ferry.net.vmnet",
    "GATEWAY_MAC": "ferry.net.vmnet",
    "GUEST_IP": "ferry.net.vmnet",
    "GUEST_MAC": "ferry.net.vmnet",
    "GuestAttachment": "ferry.net.vmnet",
    "GuestIdentity": "ferry.net.vmnet",
    "NamespaceGuest": "ferry.net.vmnet",
    "NetState": "ferry.net.vmnet",
    "TapAttachment": "ferry.net.vmnet",
    "VMNetwork": "ferry.net.vmnet",
})
