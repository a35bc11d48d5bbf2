"""The node daemon: one long-running ferry per host, with an HTTP API (``ferry daemon``).

* :mod:`ferry.daemon.api`: the FastAPI application (``/v1/...``, ``/openapi.json``,
  ``/metrics``); every route calls the same library the CLI calls: VM holders are
  the processes of :mod:`ferry.node` (one per VM), so VMs outlive the daemon and a
  restarted daemon finds them in the host's run directory;
* :mod:`ferry.daemon.models`: the request and reply bodies (pydantic, validated);
* :mod:`ferry.daemon.operations`: long operations (run, migrate) as resources that can
  be polled and cancelled;
* :mod:`ferry.daemon.problems`: errors as RFC 9457 problem details, never a traceback;
* :mod:`ferry.daemon.metrics`: the Prometheus exposition;
* :mod:`ferry.daemon.serve`: the listening sockets (a 0600 UNIX socket; TCP only with a
  bearer token) and uvicorn;
* :mod:`ferry.daemon.client`: a small client over the UNIX socket (stdlib only).

Below: :mod:`ferry.node` (the processes that hold VMs).
"""
