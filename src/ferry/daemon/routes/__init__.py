"""The API's routes, one module per resource; each builds an ``APIRouter`` over the
shared :class:`~ferry.daemon.state.Daemon`:

* :mod:`~ferry.daemon.routes.node`: the node, events, metrics and the dashboard;
* :mod:`~ferry.daemon.routes.vms`: VMs and receivers;
* :mod:`~ferry.daemon.routes.operations`: operations and the migration history;
* :mod:`~ferry.daemon.routes.packages`: the package cache;
* :mod:`~ferry.daemon.routes.volumes`: volumes (disks that outlive a VM).
"""
