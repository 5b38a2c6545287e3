"""Result storage through the public API: URL delivery, tenant policy, fallback."""

# ruff: noqa: F811  (the emulator fixtures are imported from test_results and used by name)

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.cloud import storage

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
from auth import keys
from auth.tokens import mint
from tests.api.test_caller_gone import access_log  # noqa: F401  (fixture)
from tests.api.test_forwarding import HoldingProcessor
from tests.api.test_results import (  # noqa: F401  (fixtures)
    ServiceAccount,
    bucket,
    emulator,
    gcs,
    service_account,
)
from tests.stack import dev_api_settings, free_port
from tools.signedurl import fetch_signed

TENANTS = """
tenants:
  - id: keeper
    scopes: [scale:content, results:store]
    storage: allow
  - id: archivist
    scopes: [scale:content]
    storage: require
  - id: nostore
    scopes: [scale:content, results:store]
"""


def start(
    tmp: Path, start_api, processor, uri: str | None, sa: ServiceAccount, tenants=TENANTS, **kw
):
    key = keys.generate_private_key()
    (tmp / "jwks.json").write_text(json.dumps({"keys": [keys.public_jwk(key, "k1")]}))
    (tmp / "tenants.yaml").write_text(tenants)
    running = start_api(
        dev_api_settings(
            f"127.0.0.1:{processor.port}",
            auth="jwt",
            jwks=str(tmp / "jwks.json"),
            tenants=str(tmp / "tenants.yaml"),
            result_store=uri,
            result_signing_key=str(sa.file),
            **kw,
        )
    )

    def call(tenant: str, scopes: list[str], delivery: int, content: bytes):
        token = mint(key, "k1", tenant=tenant, scopes=scopes, ttl=600)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            return imagescaler_pb2_grpc.ImageScalerStub(channel).ScaleImage(
                pb.ScaleImageRequest(image=pb.Image(content=content), delivery=delivery),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=20,
            )

    call.port = running.port  # type: ignore[attr-defined]
    call.token = lambda tenant, scopes: mint(key, "k1", tenant=tenant, scopes=scopes, ttl=600)  # type: ignore[attr-defined]
    return call


def test_url_delivery_round_trip(
    tmp_path, start_api, processor, bucket: storage.Bucket, service_account, sample_jpeg
) -> None:
    call = start(tmp_path, start_api, processor, f"gs://{bucket.name}/out", service_account)
    both = call(
        "keeper", ["scale:content", "results:store"], pb.DELIVERY_URL_AND_INLINE, sample_jpeg
    )
    url_only = call("keeper", ["scale:content", "results:store"], pb.DELIVERY_URL, sample_jpeg)
    assert url_only.content == b"" and url_only.stored.url
    assert url_only.stored.sha256 == both.stored.sha256
    fetched = fetch_signed(
        url_only.stored.url,
        url_only.stored.size,
        url_only.stored.content_type,
        10,
        url_only.stored.sha256,
    )
    assert fetched == both.content
    names = [b.name for b in bucket.list_blobs()]
    assert names == [f"out/keeper/{both.stored.sha256}.jpeg"]


def test_tenant_policy(tmp_path, start_api, processor, bucket, service_account, sample_jpeg):
    call = start(tmp_path, start_api, processor, f"gs://{bucket.name}/p", service_account)
    with pytest.raises(grpc.RpcError) as forbidden:
        call("nostore", ["scale:content", "results:store"], pb.DELIVERY_URL, sample_jpeg)
    assert forbidden.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as no_scope:
        call("keeper", ["scale:content"], pb.DELIVERY_URL, sample_jpeg)
    assert no_scope.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "results:store" in no_scope.value.details()
    legacy = call("archivist", ["scale:content"], pb.DELIVERY_INLINE, sample_jpeg)
    assert legacy.content and legacy.stored.url  # required storage, old client still served
    plain = call("keeper", ["scale:content"], pb.DELIVERY_INLINE, sample_jpeg)
    assert plain.content and not plain.HasField("stored")


@pytest.mark.parametrize("fallback", [False, True])
def test_storage_down(
    tmp_path, start_api, processor, service_account, sample_jpeg, monkeypatch, fallback: bool
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    call = start(
        tmp_path,
        start_api,
        processor,
        "gs://down/x",
        service_account,
        result_fallback_inline=fallback,
    )
    args = ("keeper", ["scale:content", "results:store"], pb.DELIVERY_URL, sample_jpeg)
    # an old client of a tenant that requires storage gets its image either way
    legacy = call("archivist", ["scale:content"], pb.DELIVERY_INLINE, sample_jpeg)
    assert legacy.content and legacy.storage_fallback and not legacy.stored.url
    if fallback:
        reply = call(*args)
        assert reply.storage_fallback and reply.content and not reply.stored.url
        return
    with pytest.raises(grpc.RpcError) as exc:
        call(*args)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "storage" in exc.value.details()


@pytest.mark.parametrize("policy", ["allow", "forbid"])  # forbid: every tenant's default
def test_url_delivery_without_a_store_is_refused_before_any_work(
    tmp_path, start_api, processor, service_account, policy
) -> None:
    tenants = (
        f"tenants: [{{id: keeper, scopes: [scale:content, results:store], storage: {policy}}}]"
    )
    call = start(tmp_path, start_api, processor, None, service_account, tenants)
    for asked in (pb.DELIVERY_URL, pb.DELIVERY_URL_AND_INLINE):
        with pytest.raises(grpc.RpcError) as exc:  # not an image: refused before it is looked at
            call("keeper", ["scale:content", "results:store"], asked, b"not an image")
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert exc.value.details() == "result storage is not configured on this service"


def test_legacy_callers_may_not_store(
    start_api, processor, bucket: storage.Bucket, service_account, sample_jpeg
) -> None:
    """--auth none: every caller is the legacy tenant, whose storage policy is forbid."""
    api = start_api(
        dev_api_settings(
            f"127.0.0.1:{processor.port}",
            result_store=f"gs://{bucket.name}/legacy",
            result_signing_key=str(service_account.file),
        )
    )
    with (
        grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel,
        pytest.raises(grpc.RpcError) as exc,
    ):
        imagescaler_pb2_grpc.ImageScalerStub(channel).ScaleImage(
            pb.ScaleImageRequest(image=pb.Image(content=sample_jpeg), delivery=pb.DELIVERY_URL),
            timeout=10,
        )
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert exc.value.details().startswith("result storage is not enabled for tenant")


def test_client_store_and_fetch(
    tmp_path, start_api, processor, bucket, service_account, sample_jpeg, capsys
) -> None:
    from tools import client

    call = start(tmp_path, start_api, processor, f"gs://{bucket.name}/c", service_account)
    photo, out = tmp_path / "in.jpg", tmp_path / "fetched.jpg"
    photo.write_bytes(sample_jpeg)
    token = call.token("keeper", ["scale:content", "results:store"])
    argv = [str(photo), "--server", f"127.0.0.1:{call.port}", "--token", token, "--store"]
    assert client.main([*argv, "--fetch", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "url " in printed and "expires " in printed
    inline = call("keeper", ["scale:content"], pb.DELIVERY_INLINE, sample_jpeg)
    assert out.read_bytes() == inline.content


def test_a_call_whose_caller_left_during_processing_stores_nothing(
    tmp_path, start_api, bucket: storage.Bucket, service_account, sample_jpeg, access_log
) -> None:
    """The result of a cancelled call was uploaded (and signed) for nobody, and logged OK."""
    held = HoldingProcessor(32 * 1024 * 1024)
    try:
        call = start(
            tmp_path,
            start_api,
            SimpleNamespace(port=held.port),
            f"gs://{bucket.name}/gone",
            service_account,
        )
        token = call.token("keeper", ["scale:content", "results:store"])
        with grpc.insecure_channel(f"127.0.0.1:{call.port}") as channel:
            request = pb.ScaleImageRequest(
                image=pb.Image(content=sample_jpeg), delivery=pb.DELIVERY_URL
            )
            future = imagescaler_pb2_grpc.ImageScalerStub(channel).ScaleImage.future(
                request, metadata=[("authorization", f"Bearer {token}")], timeout=30
            )
            assert held.arrived.wait(timeout=10)  # the processor has the image
            future.cancel()
            held.release.set()
            assert access_log.wait_for(1, timeout=10)
    finally:
        held.release.set()
        held.server.stop(0)
    assert access_log.codes == ["CANCELLED"]
    assert list(bucket.list_blobs()) == []
