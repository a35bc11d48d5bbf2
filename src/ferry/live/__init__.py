"""Live migration of a running QEMU VM between hosts (see docs/live-migration.md).

Public API::

    local_devices(memory, disks) -> VMDevices                         chainable stacks
    migrate_out(vm, devices, channel, *, agent=None, options=LiveOptions(),
                on_handed_off=None) -> SourceReport                   source side
    report_exchange.fetch_report / serve_report       after it: clocks, the destination's
                                                      report; MigrationSummary.of(...) sums up
    IncomingVM(config, *, work_dir, name, options, backing, bases, wrap_argv)  destination side:
        async with ...: report = await incoming.receive(channel); incoming.vm / .devices
    LiveOptions(mode, policy, agent_hooks, ...)
    Access(tls, token, insecure).connect(host, port) / .listen(host, port) / .accept(l)
                                        the link: ferry.transport TCP/TLS tuned to notice
                                        a dead peer (ferry.transport.tuning)
"""

from typing import TYPE_CHECKING

from ferry.lazy import lazy_exports

if TYPE_CHECKING:
    from ferry.live.destination import IncomingVM
    from ferry.live.downtime import STEPS, Downtime
    from ferry.live.errors import HandoffPayloadError, LiveMigrationError
    from ferry.live.report import DestinationReport, SourceReport
    from ferry.live.source import FAST_POLICY, LiveOptions, migrate_out
    from ferry.live.summary import MigrationSummary
    from ferry.vm.devices import LiveDevice, VMDevices, local_devices

__all__ = [
    "FAST_POLICY",
    "STEPS",
    "DestinationReport",
    "Downtime",
    "HandoffPayloadError",
    "IncomingVM",
    "LiveDevice",
    "LiveMigrationError",
    "LiveOptions",
    "MigrationSummary",
    "SourceReport",
    "VMDevices",
    "local_devices",
    "migrate_out",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "IncomingVM": "ferry.live.destination",
    "STEPS": "ferry.live.downtime",
    "Downtime": "ferry.live.downtime",
    "HandoffPayloadError": "ferry.live.errors",
    "LiveMigrationError": "ferry.live.errors",
    "DestinationReport": "ferry.live.report",
    "SourceReport": "ferry.live.report",
    "FAST_POLICY": "ferry.live.source",
    "LiveOptions": "ferry.live.source",
    "migrate_out": "ferry.live.source",
    "MigrationSummary": "ferry.live.summary",
    "LiveDevice": "ferry.vm.devices",
    "VMDevices": "ferry.vm.devices",
    "local_devices": "ferry.vm.devices",
})
