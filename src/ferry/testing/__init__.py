"""Test and benchmark helpers, public like ``trio.testing``.

* :mod:`ferry.testing.hosts`: network namespaces that stand in for hosts;
* :mod:`ferry.testing.workload`: a Redis writer that counts lost writes and stalls;
* :mod:`ferry.testing.live`: a small kernel, initramfs and launch offers for tests;
* :mod:`ferry.testing.site`: namespace hosts driven through the ``ferry`` CLI;
* :mod:`ferry.testing.packages`: signed packages made with ``ferry vm snapshot``;
* :mod:`ferry.testing.redis_hops`: a Redis VM migrated along a route under writes;

Nothing in ``ferry`` below the demo imports this package.
"""
