"""The cluster's errors::

    FerryError
    └── ClusterError                 the cluster's state or a cluster operation failed
        ├── ClusterUnavailableError  etcd did not answer (.endpoint)
        └── EvacuationError          an evacuation could not start (.node)
"""

from __future__ import annotations

from ferry.errors import FerryError


class ClusterError(FerryError):
    """The cluster's state or a cluster operation failed."""


class ClusterUnavailableError(ClusterError):
    """etcd did not answer (down, partitioned, or refused the request)."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(f"etcd {endpoint}: {message}" if endpoint else message)
        self.endpoint = endpoint


class EvacuationError(ClusterError):
    """An evacuation could not start (unknown node, one already running)."""

    def __init__(self, message: str, *, node: str) -> None:
        super().__init__(f"node {node}: {message}")
        self.node = node


class RestoreError(ClusterError):
    """A target node did not restore a dead node's VM from its mirror."""

    def __init__(self, message: str, *, node: str) -> None:
        super().__init__(f"node {node}: {message}")
        self.node = node
