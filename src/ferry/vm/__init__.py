"""One VM on one host: its package, snapshot, resume, devices and records.

Layers below: :mod:`ferry.guest` (what runs in the guest), :mod:`ferry.qemu` (the
VMM driver). Above: :mod:`ferry.live` (moving a running VM), :mod:`ferry.node`
(the processes that hold VMs).

Modules::

    manifest   the VM manifest inside a package (machine, devices, forwards)
    snapshot   boot a blueprint's image, wait for its agent, save a package
    pkgcache   extracted packages, shared by every VM resumed from them
    runner     resume a package: FUSE RAM, NBD disks, network, QEMU
    devices    a VM's chainable device stacks (memory, disks, state)
    registry   this host's VM records and paths (run, state directories)
    publish    ``--publish`` port-forward specs
"""
