"""Spot and preemption notices from the cloud providers' metadata services.

When a provider takes a machine back it says so first, on the link-local metadata
service at 169.254.169.254: AWS two minutes ahead (IMDSv2 ``spot/instance-action``),
GCP about 30 s ahead (``instance/preempted`` turns ``TRUE``), Azure at least 30 s ahead
(a Scheduled Events ``Preempt``). A watcher turns that into one :class:`Notice` per event
and hands it to a callback; evacuating the node is the caller's business (the daemon's
``--spot-watch``, docs/spot.md).

Each provider is a sans-IO core (:mod:`.aws`, :mod:`.gcp`, :mod:`.azure`) that validates
every answer strictly; :mod:`.watch` drives a core over HTTP. Local emulators of the three
services are in :mod:`ferry.testing.metadata`.
"""

from ferry.spot.errors import (
    MetadataResponseError,
    MetadataUnreachableError,
    NoMetadataServiceError,
    SpotError,
)
from ferry.spot.notice import WINDOW_S, Action, Notice, Provider
from ferry.spot.watch import METADATA_URL, SpotWatcher, detect, watcher_for

__all__ = [
    "METADATA_URL",
    "WINDOW_S",
    "Action",
    "MetadataResponseError",
    "MetadataUnreachableError",
    "NoMetadataServiceError",
    "Notice",
    "Provider",
    "SpotError",
    "SpotWatcher",
    "detect",
    "watcher_for",
]
