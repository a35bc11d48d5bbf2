"""Files ferry installs into every guest, and the console markers they print.

Boot is two stages:

1. ``init`` (initramfs ``/init``): mounts proc/sys/dev, ``insmod``\\ s the
   virtio modules listed in ``/etc/ferry/modules`` (dependencies first), then
   mounts the root disk (``ferry.root=``, default ``/dev/vda``) and
   ``switch_root``\\ s into its ``/sbin/init``. Without a disk (or with
   ``ferry.root=none``) it runs the initramfs's own ``/sbin/init``.
2. busybox ``init`` reads ``inittab``: ``rc`` (sysinit) mounts the rest,
   configures the network from ``ferry.ip=ADDR/PREFIX ferry.gw=GW``, prints
   :data:`MARKER_BOOTED`; then ``start-agent`` runs ``/ferry/agent/agent`` if
   present (the hook for the guest agent) and ``run-workload`` runs the
   blueprint's workload from ``/ferry/blueprint.env`` and prints
   :data:`MARKER_READY` once its readiness command succeeds; a root shell
   runs on the serial console (``ttyS0``, respawned) for ``ferry vm attach``.

The markers go to the serial console; hosts wait for them.
"""

from __future__ import annotations

from pathlib import Path

MARKER_STAGE1 = "ferry-guest: stage1"
MARKER_BOOTED = "ferry-guest: booted"
MARKER_READY = "ferry-guest: ready"
MARKER_WORKLOAD_EXIT = "ferry-guest: workload exited"
MARKER_AGENT = "ferry-guest: agent started"

GUEST_FILES_DIR = Path(__file__).parent

# (guest path, file name in this directory, mode)
STAGE1_FILES = (("/init", "init", 0o755),)
STAGE2_FILES = (
    ("/etc/inittab", "inittab", 0o644),
    ("/ferry/rc", "rc", 0o755),
    ("/ferry/run-workload", "run-workload", 0o755),
    ("/ferry/start-agent", "start-agent", 0o755),
    ("/ferry/shutdown", "shutdown", 0o755),
)
