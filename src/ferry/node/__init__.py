"""The processes that hold VMs on a host, and their control sockets.

* :mod:`ferry.node.holder`: what every VM-holding process does once its VM runs
  (run dir, record, control ops, watch, cleanup before a ``stop`` is answered);
* :mod:`ferry.node.supervisor`: ``ferry vm run`` (resume a package, then hold it);
* :mod:`ferry.node.arrival`: ``ferry vm receive`` (decide where an arriving VM lands,
  then hold it);
* :mod:`ferry.node.process`: a holder in its own process (``--detach``);
* :mod:`ferry.node.control`: the control socket's typed ops, codec, server and client;
* :mod:`ferry.node.outgoing`: the ``migrate`` / ``migrate-cancel`` ops;
* :mod:`ferry.node.record`: the ``supervisor.json`` record.

Below: :mod:`ferry.live` (moving a VM), :mod:`ferry.vm` (one VM on one host).
"""
