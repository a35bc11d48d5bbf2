"""The processes that hold VMs on a host, and their control sockets.

* :mod:`ferry.node.supervisor`: the process behind ``ferry vm run``;
* :mod:`ferry.node.arrival`: the process behind ``ferry vm receive``;
* :mod:`ferry.node.control`: the control socket's ops and its client.

Below: :mod:`ferry.live` (moving a VM), :mod:`ferry.vm` (one VM on one host).
"""
