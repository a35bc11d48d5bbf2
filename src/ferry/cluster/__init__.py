"""The cluster: nodes, VM placement, migrations and evacuations as keys in etcd.

* :mod:`ferry.cluster.keys`: the key layout and the records stored under it (JSON);
* :mod:`ferry.cluster.scheduler`: pure placement logic (free memory and VM slots,
  never a cordoned, noticed or dead node, incoming-migration limits);
* :mod:`ferry.cluster.store`: etcd through ``aetcd`` (leases, transactions, watches),
  its errors translated once into :class:`~ferry.cluster.errors.ClusterUnavailableError`;
* :mod:`ferry.cluster.membership`: one node in the cluster (register under a lease,
  heartbeat, keep its VMs' placement keys current, mark nodes whose lease expired dead,
  keep its VMs running and retry with backoff while etcd is away);
* :mod:`ferry.cluster.evacuate`: move every VM off a node before a deadline;
* :mod:`ferry.cluster.restore`: bring a dead node's mirrored VMs back on the nodes that
  live, from their mirrors' last checkpoints.

See ``docs/cluster.md``.
"""
