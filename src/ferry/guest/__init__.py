"""What is built for the guest and how the host talks to it.

* :mod:`ferry.guest.image`: kernel, initramfs and root disk built from a
  blueprint (Debian packages), plus the compiled guest agent;
* :mod:`ferry.guest.agent`: the host side of the in-guest agent (protocol,
  client, suspend/resume hooks);
* :mod:`ferry.guest.files`: the files copied into the guest (init, rc, the
  agent's C source); ``ferry/guest/blueprints``: the shipped blueprints.

Nothing here starts QEMU: that is :mod:`ferry.qemu`, one floor up.
"""
