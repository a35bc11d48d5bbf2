"""A local OCI registry for tests, benchmarks and demos: Debian's ``docker-registry``.

:func:`local_registry` starts the distribution registry (``/usr/bin/docker-registry``,
Debian package ``docker-registry``) on a free loopback port, with its storage in a
directory of the caller's and a config file generated there, waits until ``GET /v2/``
answers 200, and stops it (SIGTERM, then SIGKILL) when the block ends, however it
ends::

    with local_registry(tmp_path) as reg:
        reg.address          # "127.0.0.1:PORT", for docker://127.0.0.1:PORT/REPO:TAG
        reg.blob_path(digest)  # where the registry keeps a blob (tests corrupt it)

The port is found by binding port 0 and closing the socket, so another process may
take it before the registry binds: the registry then exits at once, and we retry on
a new port (:data:`PORT_ATTEMPTS` times). By default plain HTTP on loopback: clients
pass ``--tls-verify=false`` (ferry's puller does so for loopback hosts by itself).

``tls=True`` serves HTTPS with a certificate for 127.0.0.1 from a CA made in ``root``
(:mod:`ferry.transport.certs`; ``LocalRegistry.ca_path`` verifies it), and
``credentials=(user, password)`` requires HTTP basic auth (an htpasswd file with a
bcrypt hash, the only kind the registry reads): what a private registry on the
internet looks like, for tests of verified HTTPS and docker-config credentials.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError
from ferry.transport.certs import create_ca, create_host_cert

log = logging.getLogger(__name__)

REGISTRY_BINARY = "docker-registry"
PORT_ATTEMPTS = 5
# The registry is ready in ~50 ms here; 20 s covers a loaded CI machine.
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0

# The registry's config, in the YAML dialect its loader reads. No auth, no TLS (loopback
# only), deletes allowed (tests remove tags), no storage health check (its 10 s timer
# would only add log noise). `http.secret` is fixed because a single instance needs no
# shared secret but the registry warns without one.
_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: ferry-local-registry
"""
_TLS = """\
  tls:
    certificate: {cert}
    key: {key}
"""
_AUTH = """\
auth:
  htpasswd:
    realm: ferry-local-registry
    path: {htpasswd}
"""


class RegistryError(FerryError):
    """The local registry could not be started or did not answer."""


@dataclass(frozen=True, slots=True)
class LocalRegistry:
    """A running local registry: its address and where it keeps its data."""

    host: str
    port: int
    storage: Path
    log_path: Path
    ca_path: Path | None = None  # with tls=True: the CA that verifies its certificate
    credentials: tuple[str, str] | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT``, the registry part of an image reference."""
        return f"{self.host}:{self.port}"

    def blob_path(self, digest: str) -> Path:
        """The file holding blob ``digest`` (``sha256:HEX``) in the registry's storage."""
        algo, _, hex_ = digest.partition(":")
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / algo / hex_[:2] / hex_
                / "data")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def answers(address: str, *, ca_path: Path | None = None,
            credentials: tuple[str, str] | None = None) -> bool:
    """Whether a registry at ``address`` answers ``GET /v2/`` with 200 (over HTTPS
    verified by ``ca_path`` if given, with basic auth if ``credentials``)."""
    request = urllib.request.Request(f"{'https' if ca_path else 'http'}://{address}/v2/")
    if credentials is not None:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=str(ca_path)) if ca_path else None
    try:
        with urllib.request.urlopen(request, timeout=1.0, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_once(root: Path, port: int, *, tls: bool,
                credentials: tuple[str, str] | None,
                ) -> tuple[subprocess.Popen[bytes], LocalRegistry] | None:
    """Start the registry on ``port``; None if it exited before answering (port taken)."""
    storage = root / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    text = _CONFIG.format(storage=storage, port=port)
    ca_path = None
    if tls:
        host = create_host_cert(root / "ca", root / "tls", "127.0.0.1", ["127.0.0.1"])
        text += _TLS.format(cert=host.cert_path, key=host.key_path)
        ca_path = host.ca_path
    if credentials is not None:
        htpasswd = root / "htpasswd"
        import bcrypt  # a dev dependency: only registries with credentials need it

        user, password = credentials
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd.write_text(f"{user}:{hashed}\n")
        text += _AUTH.format(htpasswd=htpasswd)
    config.write_text(text)
    reg = LocalRegistry("127.0.0.1", port, storage, root / "registry.log", ca_path,
                        credentials)
    with reg.log_path.open("ab") as log_file:
        proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            if answers(reg.address, ca_path=reg.ca_path, credentials=reg.credentials):
                return proc, reg
            time.sleep(0.05)
    except BaseException:
        _stop(proc)
        raise
    _stop(proc)
    raise RegistryError(f"docker-registry did not answer on {reg.address} within "
                        f"{READY_TIMEOUT_S:.0f} s (log: {reg.log_path})")


@contextlib.contextmanager
def local_registry(root: Path, *, tls: bool = False,
                   credentials: tuple[str, str] | None = None,
                   port: int | None = None) -> Iterator[LocalRegistry]:
    """Run a registry with its config, log and storage under ``root`` for the block
    (on ``port`` if given: then a port already taken is an error, not a retry)."""
    if shutil.which(REGISTRY_BINARY) is None:
        raise RegistryError(f"{REGISTRY_BINARY} is not installed (apt-get install "
                            "docker-registry; scripts/setup.sh does)")
    root.mkdir(parents=True, exist_ok=True)
    if tls and not (root / "ca").is_dir():
        create_ca(root / "ca")
    for _ in range(1 if port else PORT_ATTEMPTS):
        started = _start_once(root, port or free_port(), tls=tls, credentials=credentials)
        if started is not None:
            break
    else:
        tail = root.joinpath("registry.log").read_text(errors="replace").strip().splitlines()
        raise RegistryError(f"docker-registry exited at start {1 if port else PORT_ATTEMPTS} "
                            "time(s)"
                            f"{': ' + tail[-1] if tail else ''}")
    proc, reg = started
    log.info("local registry on %s (pid %d, storage %s)", reg.address, proc.pid, reg.storage)
    try:
        yield reg
    finally:
        _stop(proc)



def main(argv: list[str] | None = None) -> int:
    """``python -m ferry.testing.registry [--push NAME ...]``: a registry for trying ferry.

    Starts the registry, pushes the named test images (:mod:`ferry.testing.oci_images`),
    prints their references, and runs until Ctrl-C or SIGTERM; then it stops the
    registry and removes its storage.
    """
    import argparse
    import sys
    import tempfile

    from ferry.hostconfig import HostConfig
    from ferry.testing.oci_images import IMAGES, build_and_push

    parser = argparse.ArgumentParser(prog="python -m ferry.testing.registry")
    parser.add_argument("--push", nargs="*", choices=sorted(IMAGES), default=[],
                        help="test images to build and push (default: none)")
    parser.add_argument("--port", type=int, help="listen on 127.0.0.1:PORT (default: a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = HostConfig.from_environ(os.environ).cache_root
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="ferry-registry-") as tmp:
        try:
            with local_registry(Path(tmp) / "registry", port=args.port) as reg:
                print(f"registry {reg.address}", flush=True)
                for name in args.push:
                    ref = build_and_push(name, reg.address, cache_dir=cache, work_dir=Path(tmp))
                    print(f"pushed {ref}", flush=True)
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
