"""Development PKI for mutual TLS between the API and the processor.

``imagescaler-admin certs`` writes a CA, a processor server certificate and an API client
certificate. In Kubernetes, cert-manager (or a Secret) provides the same files instead.
:func:`issue` is also what tests use to make expired, foreign-CA or other-identity certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

API_IDENTITY = "imagescaler-api"
PROCESSOR_NAMES = ("localhost", "127.0.0.1", "::1")
CLOCK_SKEW = datetime.timedelta(minutes=5)

Purpose = Literal["ca", "server", "client"]
_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key (a CA or a leaf)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Key first, so a reader that sees the new certificate also finds its key."""
        write_atomic(key_path, self.key_pem(), mode=0o600)
        write_atomic(cert_path, self.cert_pem(), mode=0o644)


@dataclass(frozen=True)
class Pki:
    """Where :func:`create_dev_pki` wrote its files."""

    ca_cert: Path
    ca_key: Path
    processor_cert: Path
    processor_key: Path
    api_cert: Path
    api_key: Path

    @classmethod
    def in_dir(cls, out: Path) -> Pki:
        return cls(
            ca_cert=out / "ca.pem",
            ca_key=out / "ca-key.pem",
            processor_cert=out / "processor.pem",
            processor_key=out / "processor-key.pem",
            api_cert=out / "api.pem",
            api_key=out / "api-key.pem",
        )

    def paths(self) -> tuple[Path, ...]:
        return (
            self.ca_cert,
            self.ca_key,
            self.processor_cert,
            self.processor_key,
            self.api_cert,
            self.api_key,
        )


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Create a temporary file with its final mode (never chmod later), then rename it in place.

    Readers (a reloading server) see either the old or the new file, never a partial one.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _validity(
    days: int, not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    start = not_before or _now() - CLOCK_SKEW
    return start, not_after or start + CLOCK_SKEW + datetime.timedelta(days=days)


def _general_name(name: str) -> x509.GeneralName:
    """An IP literal becomes an IP SAN, ``scheme://...`` a URI SAN, anything else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if "://" in name:
        return x509.UniformResourceIdentifier(name)
    return x509.DNSName(name)


def _key_usage(purpose: Purpose) -> x509.KeyUsage:
    ca = purpose == "ca"
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: str,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    validity: tuple[datetime.datetime, datetime.datetime],
    purpose: Purpose,
) -> x509.CertificateBuilder:
    ca = purpose == "ca"
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(_key_usage(purpose), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def new_authority(
    common_name: str = "imagescaler development CA",
    *,
    days: int = 365,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertifiedKey:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    validity = _validity(days, not_before, not_after)
    builder = _builder(common_name, name, key.public_key(), validity, "ca")
    return CertifiedKey(builder.sign(key, hashes.SHA256()), key)


def load_authority(cert_path: Path, key_path: Path) -> CertifiedKey:
    """A CA written by :func:`create_dev_pki`, to issue further certificates with it."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return CertifiedKey(cert, key)


def issue(
    ca: CertifiedKey,
    common_name: str,
    *,
    purpose: Literal["server", "client"],
    names: Sequence[str] = (),
    days: int = 90,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertifiedKey:
    """A leaf certificate signed by ``ca``; ``names`` become SANs (IP, URI or DNS)."""
    key = ec.generate_private_key(ec.SECP256R1())
    validity = _validity(days, not_before, not_after)
    builder = _builder(common_name, ca.cert.subject, key.public_key(), validity, purpose)
    builder = builder.add_extension(x509.ExtendedKeyUsage([_EKU[purpose]]), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
    )
    if names:
        sans = x509.SubjectAlternativeName([_general_name(n) for n in names])
        builder = builder.add_extension(sans, critical=False)
    return CertifiedKey(builder.sign(ca.key, hashes.SHA256()), key)


def processor_names(dns: Sequence[str]) -> list[str]:
    """The processor's SANs: loopback names plus the given (e.g. Kubernetes Service) names."""
    return list(dict.fromkeys([*PROCESSOR_NAMES, *dns]))


def create_dev_pki(
    out: Path, dns: Sequence[str] = (), days: int = 90, *, overwrite: bool = False
) -> Pki:
    """Write a development CA, a processor server and an API client certificate into ``out``.

    Refuses to replace existing files unless ``overwrite``: a new CA breaks every peer.
    """
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    pki = Pki.in_dir(out)
    existing = [p for p in pki.paths() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(map(str, existing))}")
    out.mkdir(parents=True, exist_ok=True)
    ca = new_authority(days=days + 1)
    ca.write(pki.ca_cert, pki.ca_key)
    issue(ca, "processor", purpose="server", names=processor_names(dns), days=days).write(
        pki.processor_cert, pki.processor_key
    )
    issue(ca, API_IDENTITY, purpose="client", names=[API_IDENTITY], days=days).write(
        pki.api_cert, pki.api_key
    )
    return pki


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


class AddOption(Protocol):
    """The admin tool's way to add an option that is also an ``IMAGESCALER_*`` variable."""

    def __call__(self, parser: argparse.ArgumentParser, flag: str, help: str, **kw: Any) -> None:
        """Like ``parser.add_argument(flag, help=help, **kw)``."""


def register(subparsers: argparse._SubParsersAction, add: AddOption) -> None:
    """Add the ``certs`` subcommand; the admin tool dispatches to ``args.run(args)``."""
    parser = subparsers.add_parser(
        "certs",
        help="create a development CA, processor server and API client certificates",
        description="Write ca.pem, ca-key.pem, processor.pem, processor-key.pem, api.pem and "
        "api-key.pem (ECDSA P-256, private keys 0600) for mutual TLS between the API and the "
        "processor. The processor certificate names localhost, 127.0.0.1 and ::1 plus every "
        f"--dns name; the API client certificate's identity is {API_IDENTITY!r}. "
        "For development: in Kubernetes, cert-manager or a Secret provides these files.",
    )
    add(parser, "--out", "directory to write the files to", type=Path, required=True, metavar="DIR")
    add(
        parser,
        "--dns",
        "extra processor names, e.g. processor.ns.svc or *.processor.ns.svc.cluster.local",
        action="extend",
        nargs="+",
        metavar="NAME",
    )
    add(parser, "--days", "validity in days, default 90", type=_positive_int, default=90)
    # a switch, so flags only: a leftover IMAGESCALER_FORCE must never replace a CA
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        pki = create_dev_pki(args.out, args.dns, args.days, overwrite=args.force)
    except FileExistsError as exc:
        print(f"certs: {exc} (use --force)", file=sys.stderr)
        return 1
    for path in pki.paths():
        print(path)
    return 0
