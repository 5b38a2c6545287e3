"""The tenant registry: strict validation with errors naming tenant and field; live reload."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from authkit import write_atomically

from auth.reloading import InvalidFile
from auth.tenants import Tenant, TenantRegistry, load_tenants, parse_tenants

REGISTRY = b"""
tenants:
  - id: acme
    scopes: [scale:content, scale:url, results:store]
    rate_limit: 20/second;600/minute
    pixel_limit: 600/minute
    max_concurrent: 8
    storage: allow
  - id: old-partner
    enabled: false
  - id: b_2
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_yaml_registry_with_defaults() -> None:
    tenants = parse_tenants(REGISTRY)
    assert tenants["acme"] == Tenant(
        id="acme",
        scopes=frozenset({"scale:content", "scale:url", "results:store"}),
        rate_limit="20/second;600/minute",
        pixel_limit="600/minute",
        max_concurrent=8,
        storage="allow",
    )
    assert tenants["old-partner"].enabled is False
    assert tenants["b_2"] == Tenant(id="b_2")
    assert tenants["b_2"].scopes == {"scale:content"} and tenants["b_2"].storage == "forbid"


def test_json_is_accepted() -> None:
    data = json.dumps({"tenants": [{"id": "acme", "scopes": ["scale:url"]}]}).encode()
    assert parse_tenants(data)["acme"].scopes == {"scale:url"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{id: Acme}", "'id' must match"),
        ("{id: 'acme\u200b'}", "'id' must match"),
        ("{id: 'acm\u0435'}", "'id' must match"),  # Cyrillic e
        ("{id: -acme}", "'id' must match"),
        ("{id: 7}", "'id' must match"),
        ("{scopes: []}", "'id' must match"),
        ("{id: acme, color: red}", "tenant 'acme': unknown field(s) color"),
        ("{id: acme, enabled: 'yes'}", "tenant 'acme': 'enabled' must be true or false"),
        ("{id: acme, scopes: scale:url}", "tenant 'acme': 'scopes' must be a list"),
        ("{id: acme, scopes: [scale:everything]}", "tenant 'acme': 'scopes': unknown"),
        ("{id: acme, rate_limit: lots}", "tenant 'acme': 'rate_limit'"),
        ("{id: acme, rate_limit: 0/second}", "tenant 'acme': 'rate_limit': amounts must be"),
        ("{id: acme, pixel_limit: 5}", "tenant 'acme': 'pixel_limit' must be a string"),
        ("{id: acme, max_concurrent: 0}", "tenant 'acme': 'max_concurrent' must be a positive"),
        ("{id: acme, max_concurrent: true}", "tenant 'acme': 'max_concurrent'"),
        ("{id: acme, storage: maybe}", "tenant 'acme': 'storage' must be one of"),
        ("not-a-mapping", "tenant #0: expected a mapping"),
    ],
)
def test_invalid_tenant_entries(entry: str, message: str) -> None:
    with pytest.raises(InvalidFile) as info:
        parse_tenants(f"tenants:\n  - {entry}\n".encode())
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"tenants: [{id: acme}, {id: acme}]", "tenant 'acme': duplicate id"),
        (b"tenants: {acme: {}}", "'tenants' must be a list"),
        (b"tenant: []", "exactly one key"),
        (b"- id: acme", "exactly one key"),
        (b"tenants: [", "not valid YAML"),
        (b"", "exactly one key"),
    ],
)
def test_invalid_documents(data: bytes, message: str) -> None:
    with pytest.raises(InvalidFile, match=message):
        parse_tenants(data)


def test_registry_follows_the_file_and_keeps_the_last_good_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_bytes(REGISTRY)
    clock = FakeClock()
    registry = TenantRegistry(path, interval=1.0, clock=clock)
    assert registry.get("acme") is not None and registry.get("nobody") is None
    write_atomically(path, b"tenants: [{id: acme, enabled: false}, {id: newcomer}]")
    clock.now = 1.0
    acme = registry.get("acme")
    assert acme is not None and not acme.enabled and registry.get("newcomer") is not None
    write_atomically(path, b"tenants: [{id: acme, storage: sometimes}]")
    clock.now = 2.0
    with caplog.at_level(logging.ERROR, logger="auth.reloading"):
        assert registry.ids() == {"acme", "newcomer"}
    assert "tenant 'acme': 'storage'" in caplog.text


def test_load_tenants_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_bytes(b"tenants: [{id: UPPER}]")
    with pytest.raises(InvalidFile, match=f"tenant registry {path}: tenant #0"):
        load_tenants(path)


def test_an_api_without_storage_refuses_tenants_that_require_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every call of such a tenant would fail; the registry is refused at start and on reload."""
    path = tmp_path / "tenants.yaml"
    path.write_bytes(b"tenants: [{id: acme, storage: require}, {id: b, storage: require}]")
    with pytest.raises(InvalidFile, match=r"b, acme|acme, b.*needs an API with --result-store"):
        TenantRegistry(path, can_store=False)
    assert TenantRegistry(path, can_store=True).get("acme") is not None
    path.write_bytes(b"tenants: [{id: acme, storage: allow}]")
    clock = FakeClock()
    registry = TenantRegistry(path, interval=1.0, clock=clock, can_store=False)
    write_atomically(path, b"tenants: [{id: acme, storage: require}, {id: newcomer}]")
    clock.now = 1.0
    with caplog.at_level(logging.ERROR, logger="auth.reloading"):
        assert registry.ids() == {"acme"}
    assert "acme: 'storage: require' needs an API with --result-store" in caplog.text


def test_a_registry_that_breaks_the_parser_itself_is_an_invalid_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Deep nesting makes the YAML parser raise RecursionError: at start an InvalidFile
    (exit 2), on reload the last good registry, never an exception out of get()."""
    path = tmp_path / "tenants.yaml"
    nested = b"tenants: " + b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(nested)
    with pytest.raises(InvalidFile, match="unreadable"):
        TenantRegistry(path)
    path.write_bytes(REGISTRY)
    clock = FakeClock()
    registry = TenantRegistry(path, interval=1.0, clock=clock)
    write_atomically(path, nested)
    clock.now = 1.0
    with caplog.at_level(logging.ERROR, logger="auth.reloading"):
        assert registry.get("acme") is not None
    assert "unreadable" in caplog.text
