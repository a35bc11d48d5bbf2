"""Live migration of a running QEMU VM between hosts (see docs/live-migration.md).

Public API::

    local_devices(memory, disks, *, with_state=False) -> VMDevices     chainable stacks
    migrate_out(vm, devices, channel, *, agent=None, options=LiveOptions(),
                on_handed_off=None) -> SourceReport                   source side
    IncomingVM(config, *, work_dir, name, options, backing, wrap_argv)  destination side:
        async with ...: report = await incoming.receive(channel); incoming.vm / .devices
    LiveOptions(mode, policy, state_transfer, agent_hooks, ...)
    link.connect(host, port, LinkOptions) / link.listen(...)   TCP/TLS noticing dead peers
"""

from ferry.live.destination import IncomingVM
from ferry.live.errors import HandoffPayloadError, LiveMigrationError
from ferry.live.link import LinkOptions
from ferry.live.report import STEPS, DestinationReport, SourceReport
from ferry.live.source import FAST_POLICY, LiveOptions, StateTransfer, migrate_out
from ferry.vm.devices import LiveDevice, VMDevices, local_devices

__all__ = [
    "FAST_POLICY",
    "STEPS",
    "DestinationReport",
    "HandoffPayloadError",
    "IncomingVM",
    "LinkOptions",
    "LiveDevice",
    "LiveMigrationError",
    "LiveOptions",
    "SourceReport",
    "StateTransfer",
    "VMDevices",
    "local_devices",
    "migrate_out",
]
