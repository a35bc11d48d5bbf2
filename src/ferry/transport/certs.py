"""A tiny private certificate authority for mutual TLS between ferry nodes.

``create_ca`` makes a self-signed CA; ``create_host_cert`` makes a host
certificate signed by it, valid as both TLS server and client (a node accepts
migrations and starts them), naming the host by DNS name and IP addresses.
Keys are ECDSA P-256, which every TLS 1.3 stack accepts. Everything is written
as PEM; private keys with mode 0600 from the moment they exist.

Layout::

    ca_dir/ca.pem  ca_dir/ca.key          create_ca
    dir/<hostname>.pem  dir/<hostname>.key  dir/ca.pem (a copy)  create_host_cert
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.errors import TLSConfigError

CA_VALIDITY_DAYS = 3650
HOST_VALIDITY_DAYS = 825
"""825 days: the longest validity common TLS clients accept for leaf certificates."""
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates are back-dated this much so a peer whose clock is slightly
behind does not reject a certificate made a moment ago."""
KEY_MODE = 0o600


@dataclass(frozen=True, slots=True)
class CAFiles:
    """Where a CA's certificate and private key were written."""

    cert_path: Path
    key_path: Path


@dataclass(frozen=True, slots=True)
class HostCertFiles:
    """A host's certificate, key, and the CA certificate that verifies its peers."""

    cert_path: Path
    key_path: Path
    ca_path: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)  # O_CREAT's mode does not apply to an existing file
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(directory: str | os.PathLike[str], name: str = "ferry-ca",
              *, overwrite: bool = False) -> CAFiles:
    """Create a CA in ``directory`` (made if missing).

    An existing CA is kept unless ``overwrite``: replacing it would silently
    invalidate every host certificate it signed.
    """
    root = Path(directory)
    files = CAFiles(root / "ca.pem", root / "ca.key")
    if not overwrite and (files.cert_path.exists() or files.key_path.exists()):
        raise TLSConfigError(f"a CA already exists in {root}")
    root.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(files.key_path, _key_pem(key))
    files.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except OSError as exc:
        raise TLSConfigError(f"cannot read the CA in {ca_dir}: {exc}") from exc
    except ValueError as exc:
        raise TLSConfigError(f"invalid CA files in {ca_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSConfigError(f"CA key in {ca_dir} is not an ECDSA key")
    return cert, key


def create_host_cert(
    ca_dir: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    hostname: str,
    ips: Sequence[str] = (),
    *,
    dns_names: Sequence[str] = (),
) -> HostCertFiles:
    """Issue a certificate for ``hostname`` (plus ``dns_names`` and ``ips``) signed
    by the CA in ``ca_dir``, written to ``directory`` with a copy of the CA cert."""
    ca_root = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_root)
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise TLSConfigError(f"invalid IP address for {hostname}: {exc}") from exc
    names = list(dict.fromkeys([hostname, *dns_names]))
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    files = HostCertFiles(root / f"{hostname}.pem", root / f"{hostname}.key", root / "ca.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=HOST_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # key_encipherment too: QEMU's TLS (NBD, migration) refuses a critical key
            # usage without it (QEMU >= 9); TLS 1.3 with EC keys does not use it.
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key_path, _key_pem(key))
    files.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if files.ca_path.resolve() != (ca_root / "ca.pem").resolve():
        shutil.copyfile(ca_root / "ca.pem", files.ca_path)
    return files
