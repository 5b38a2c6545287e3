"""The tenant registry: who may call, with which features and limits.

A YAML (or JSON, which is YAML) file, usually a mounted ConfigMap, re-read when it changes;
an invalid new version is logged and the last good one stays in use. Example::

    tenants:
      - id: acme
        scopes: [scale:content, scale:url]
        rate_limit: 20/second;600/minute
        pixel_limit: 600/minute      # megapixels per period
        max_concurrent: 8
        storage: allow               # forbid (default) | allow | require
      - id: old-partner
        enabled: false

Tenant ids are lowercase ASCII (``[a-z0-9][a-z0-9_-]{0,62}``), so two ids can never differ
only by case or invisible characters when they become rate-limit keys or storage paths.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import limits
import yaml

from auth.reloading import InvalidFile, ReloadingFile

TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
SCOPE_CONTENT = "scale:content"  # inline image bytes
SCOPE_URL = "scale:url"  # the service fetches a URL
SCOPE_STORE = "results:store"  # results kept in storage, delivered by signed URL
SCOPES = frozenset({SCOPE_CONTENT, SCOPE_URL, SCOPE_STORE})
DEFAULT_SCOPES = frozenset({SCOPE_CONTENT})
STORAGE_MODES = ("forbid", "allow", "require")


@dataclass(frozen=True)
class Tenant:
    """One tenant's policy. ``None`` limits mean "no per-tenant limit"."""

    id: str
    enabled: bool = True
    scopes: frozenset[str] = DEFAULT_SCOPES
    rate_limit: str | None = None  # limits notation, e.g. "20/second;600/minute"
    pixel_limit: str | None = None  # megapixels per period, e.g. "600/minute"
    max_concurrent: int | None = None
    storage: str = "forbid"


class TenantLookup(Protocol):
    """Anything with ``get(id)``: a TenantRegistry, or a plain dict in tests and development."""

    def get(self, tenant_id: str, /) -> Tenant | None: ...


_FIELDS = ("id", "enabled", "scopes", "rate_limit", "pixel_limit", "max_concurrent", "storage")


def parse_tenants(data: bytes) -> dict[str, Tenant]:
    """Every tenant of a registry document by id; InvalidFile names the tenant and field."""
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise InvalidFile(f"not valid YAML/JSON: {exc}") from exc
    if not isinstance(document, dict) or set(document) != {"tenants"}:
        raise InvalidFile("expected a mapping with exactly one key, 'tenants'")
    entries = document["tenants"]
    if not isinstance(entries, list):
        raise InvalidFile("'tenants' must be a list")
    tenants: dict[str, Tenant] = {}
    for index, entry in enumerate(entries):
        tenant = _tenant(entry, index)
        if tenant.id in tenants:
            raise InvalidFile(f"tenant {tenant.id!r}: duplicate id")
        tenants[tenant.id] = tenant
    return tenants


def _tenant(entry: Any, index: int) -> Tenant:
    if not isinstance(entry, dict):
        raise InvalidFile(f"tenant #{index}: expected a mapping")
    tenant_id = entry.get("id")
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise InvalidFile(
            f"tenant #{index}: 'id' must match {TENANT_ID_PATTERN.pattern}, got {tenant_id!r}"
        )
    unknown = sorted(set(map(str, entry)) - set(_FIELDS))
    if unknown:
        raise InvalidFile(f"tenant {tenant_id!r}: unknown field(s) {', '.join(unknown)}")
    try:
        return _build(tenant_id, entry)
    except ValueError as exc:
        raise InvalidFile(f"tenant {tenant_id!r}: {exc}") from exc


def _build(tenant_id: str, entry: Mapping[str, Any]) -> Tenant:
    return Tenant(
        id=tenant_id,
        enabled=_bool(entry, "enabled", True),
        scopes=_scope_set(entry),
        rate_limit=_limit(entry, "rate_limit"),
        pixel_limit=_limit(entry, "pixel_limit"),
        max_concurrent=_positive_int(entry, "max_concurrent"),
        storage=_storage(entry),
    )


def _bool(entry: Mapping[str, Any], name: str, default: bool) -> bool:
    value = entry.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"'{name}' must be true or false, got {value!r}")
    return value


def _scope_set(entry: Mapping[str, Any]) -> frozenset[str]:
    if "scopes" not in entry:
        return DEFAULT_SCOPES
    value = entry["scopes"]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"'scopes' must be a list of strings, got {value!r}")
    unknown = sorted(set(value) - SCOPES)
    if unknown:
        raise ValueError(f"'scopes': unknown {unknown}; known: {sorted(SCOPES)}")
    return frozenset(value)


def _limit(entry: Mapping[str, Any], name: str) -> str | None:
    """A ``limits`` string such as ``20/second;600/minute``, checked by the library itself."""
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string such as '20/second;600/minute'")
    try:
        items = limits.parse_many(value)
    except ValueError as exc:
        raise ValueError(f"'{name}': {exc}") from exc
    if any(item.amount <= 0 for item in items):
        raise ValueError(f"'{name}': amounts must be positive (use enabled: false to block)")
    return value


def _positive_int(entry: Mapping[str, Any], name: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
    return value


def _storage(entry: Mapping[str, Any]) -> str:
    value = entry.get("storage", "forbid")
    if value not in STORAGE_MODES:
        raise ValueError(f"'storage' must be one of {', '.join(STORAGE_MODES)}, got {value!r}")
    return str(value)


def load_tenants(path: str | Path) -> dict[str, Tenant]:
    """Read and validate a registry once (``imagescaler-admin tenants check``)."""
    return ReloadingFile(path, parse_tenants, "tenant registry").current()


def without_storage(tenants: dict[str, Tenant]) -> dict[str, Tenant]:
    """Refuse a registry that requires storage of an API that stores nothing: every call of
    such a tenant would fail, so the registry is refused instead (at start, or on reload)."""
    needing = sorted(t.id for t in tenants.values() if t.storage == "require")
    if needing:
        raise InvalidFile(
            f"tenant(s) {', '.join(needing)}: 'storage: require' needs an API with --result-store"
        )
    return tenants


class TenantRegistry:
    """Tenants by id from a file that is re-read when it changes."""

    def __init__(
        self,
        path: str | Path,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        can_store: bool = True,
    ) -> None:
        parse = parse_tenants if can_store else lambda data: without_storage(parse_tenants(data))
        self._file = ReloadingFile(path, parse, "tenant registry", interval, clock)

    def get(self, tenant_id: str) -> Tenant | None:
        return self._file.current().get(tenant_id)

    def ids(self) -> frozenset[str]:
        return frozenset(self._file.current())
