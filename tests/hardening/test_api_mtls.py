"""Mutual TLS between the real API and the real processor: every wrong certificate is refused at
the handshake (the public caller sees UNAVAILABLE naming the processor), and the API never falls
back to plaintext."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # handshake failures are expected here

import datetime
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.hardening.hostile import PROCESSOR_LABELS, Client, encode, photo
from tests.stack import dev_api_settings
from tools import certs
from tools.certs import API_IDENTITY, CertifiedKey, Pki

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def image() -> bytes:
    return encode(photo((320, 240)), "JPEG")


@dataclass
class Mtls:
    """A development PKI, a way to issue more certificates, and the servers started with it."""

    pki: Pki
    ca: CertifiedKey
    tmp: Path
    start_processor: Callable[..., Any]
    start_api: Callable[..., Any]
    clients: list[Client]

    def write(self, name: str, cert: CertifiedKey) -> tuple[str, str]:
        paths = self.tmp / f"{name}.crt", self.tmp / f"{name}.key"
        cert.write(*paths)
        return str(paths[0]), str(paths[1])

    def processor(self, cert: CertifiedKey | None = None, **overrides: Any) -> Any:
        cert_path, key_path = (
            (str(self.pki.processor_cert), str(self.pki.processor_key))
            if cert is None
            else self.write("processor", cert)
        )
        settings = {
            "insecure": False,
            "tls_cert": cert_path,
            "tls_key": key_path,
            "tls_client_ca": str(self.pki.ca_cert),
            "allow_client": (API_IDENTITY,),
            **overrides,
        }
        return self.start_processor(**settings)

    def api(
        self,
        port: int,
        cert: CertifiedKey | None = None,
        ca: CertifiedKey | None = None,
        **overrides: Any,
    ) -> Client:
        cert_path, key_path = (
            (str(self.pki.api_cert), str(self.pki.api_key))
            if cert is None
            else self.write("api", cert)
        )
        ca_path = str(self.pki.ca_cert)
        if ca is not None:
            ca_path = str(self.tmp / "other-ca.crt")
            Path(ca_path).write_bytes(ca.cert_pem())
        settings = dev_api_settings(
            f"127.0.0.1:{port}",
            processor_insecure=False,
            processor_ca=ca_path,
            processor_cert=cert_path,
            processor_key=key_path,
            **overrides,
        )
        self.clients.append(Client(self.start_api(settings).port))
        return self.clients[-1]

    def client_cert(self, name: str = API_IDENTITY, **kw: Any) -> CertifiedKey:
        return certs.issue(kw.pop("ca", self.ca), name, purpose="client", names=[name], **kw)

    def server_cert(self, names: list[str], **kw: Any) -> CertifiedKey:
        return certs.issue(kw.pop("ca", self.ca), "processor", purpose="server", names=names, **kw)


@pytest.fixture
def mtls(tmp_path: Path, start_processor, start_api) -> Iterator[Mtls]:
    pki = certs.create_dev_pki(tmp_path / "pki")
    setup = Mtls(
        pki,
        certs.load_authority(pki.ca_cert, pki.ca_key),
        tmp_path,
        start_processor,
        start_api,
        [],
    )
    yield setup
    for client in setup.clients:
        client.close()


def processor_calls(processor: Any) -> float:
    return processor.registry.get_sample_value("grpc_server_started_total", PROCESSOR_LABELS) or 0


def refused(client: Client) -> grpc.RpcError:
    started = time.monotonic()
    error = client.refusal(image(), timeout=10)
    assert time.monotonic() - started < 5
    assert error.code() == UNAVAILABLE
    assert "image processor" in error.details()
    return error


def test_matching_certificates_work(mtls: Mtls) -> None:
    processor = mtls.processor()
    assert mtls.api(processor.port).scale(image()).info.scaled
    assert processor_calls(processor) == 1


CLIENT_CERTS: dict[str, Callable[[Mtls], CertifiedKey]] = {
    "other-ca": lambda m: m.client_cert(ca=certs.new_authority("another CA")),
    "expired": lambda m: m.client_cert(not_before=NOW - 10 * DAY, not_after=NOW - DAY),
    "not-yet-valid": lambda m: m.client_cert(not_before=NOW + DAY, days=30),
    "self-signed": lambda m: certs.new_authority(API_IDENTITY),
    "server-purpose-only": lambda m: m.server_cert([API_IDENTITY]),
}


@pytest.mark.parametrize("case", CLIENT_CERTS)
def test_wrong_api_certificate_refused_at_the_handshake(mtls: Mtls, case: str) -> None:
    processor = mtls.processor()
    client = mtls.api(processor.port, cert=CLIENT_CERTS[case](mtls))
    refused(client)
    assert processor_calls(processor) == 0


def test_api_identity_not_allowed_by_the_processor(mtls: Mtls, caplog) -> None:
    """A valid certificate with the wrong name: even the API's health watch is refused."""
    processor = mtls.processor()
    client = mtls.api(processor.port, cert=mtls.client_cert("imagescaler-loadgen"))
    refused(client)
    assert processor_calls(processor) == 0
    assert "with identities ['imagescaler-loadgen']" in caplog.text


SERVER_CERTS: dict[str, Callable[[Mtls], CertifiedKey]] = {
    "other-ca": lambda m: m.server_cert(["127.0.0.1"], ca=certs.new_authority("another CA")),
    "expired": lambda m: m.server_cert(["127.0.0.1"], not_before=NOW - 9 * DAY, not_after=NOW),
    "wrong-name": lambda m: m.server_cert(["processor.elsewhere"]),
    "client-purpose-only": lambda m: m.client_cert("127.0.0.1"),
}


@pytest.mark.parametrize("case", SERVER_CERTS)
def test_wrong_processor_certificate_refused_by_the_api(mtls: Mtls, case: str) -> None:
    processor = mtls.processor(cert=SERVER_CERTS[case](mtls))
    refused(mtls.api(processor.port))
    assert processor_calls(processor) == 0


def test_api_trusting_another_ca_refuses_the_processor(mtls: Mtls) -> None:
    processor = mtls.processor()
    refused(mtls.api(processor.port, ca=certs.new_authority("another CA")))
    assert processor_calls(processor) == 0


def test_server_name_override_is_what_gets_verified(mtls: Mtls) -> None:
    """The dialed address is 127.0.0.1; the certificate names only the Service."""
    processor = mtls.processor(cert=mtls.server_cert(["processor.ns.svc"]))
    assert mtls.api(processor.port, processor_server_name="processor.ns.svc").scale(image())
    refused(mtls.api(processor.port, processor_server_name="other.ns.svc"))


def test_mtls_api_never_falls_back_to_a_plaintext_processor(mtls: Mtls) -> None:
    plaintext = mtls.start_processor()  # the fixture's default: --insecure
    client = mtls.api(plaintext.port)
    for _ in range(3):
        refused(client)
    assert processor_calls(plaintext) == 0


def test_plaintext_api_cannot_reach_an_mtls_processor(mtls: Mtls) -> None:
    processor = mtls.processor()
    client = Client(mtls.start_api(dev_api_settings(f"127.0.0.1:{processor.port}")).port)
    mtls.clients.append(client)
    refused(client)
    assert processor_calls(processor) == 0


def test_unusable_api_key_fails_at_startup_not_in_plaintext(mtls: Mtls) -> None:
    processor = mtls.processor()
    other = mtls.client_cert()
    cert_path, _ = mtls.write("api", mtls.client_cert())
    _, other_key = mtls.write("other", other)
    settings = dev_api_settings(
        f"127.0.0.1:{processor.port}",
        processor_insecure=False,
        processor_ca=str(mtls.pki.ca_cert),
        processor_cert=cert_path,
        processor_key=other_key,
    )
    with pytest.raises(ValueError, match="does not match"):
        mtls.start_api(settings)


def test_rotation_to_a_wrong_certificate_refuses_then_recovers(mtls: Mtls) -> None:
    """New files from another CA are used (and refused); they never mean "no TLS"."""
    processor = mtls.processor()
    good = mtls.client_cert()
    cert_path, key_path = mtls.write("api", good)
    settings = dev_api_settings(
        f"127.0.0.1:{processor.port}",
        processor_insecure=False,
        processor_ca=str(mtls.pki.ca_cert),
        processor_cert=cert_path,
        processor_key=key_path,
    )
    client = Client(mtls.start_api(settings).port)
    mtls.clients.append(client)
    assert client.scale(image()).info.scaled
    mtls.write("api", mtls.client_cert(ca=certs.new_authority("another CA")))
    refused(client)
    mtls.write("api", good)
    assert client.scale(image()).info.scaled
    assert processor_calls(processor) == 2
