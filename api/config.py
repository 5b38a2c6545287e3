"""The API's settings: one frozen object built and validated once at startup."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from PIL import Image

from api.ratelimit import SCHEMES as RATELIMIT_SCHEMES
from auth.revocation import redis_url_parses, revocation_store_supported
from auth.tokens import MAX_LEEWAY
from processor import imaging
from processor import options as opt
from processor.config import default_workers
from processor.service import MAX_SIDE

FITS = ("pad", "fill", "fit", "stretch")
FORMATS = ("jpeg", "png", "webp")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def color(text: str) -> int:
    """``#RRGGBB`` (or ``RRGGBB``) as an integer."""
    digits = text.strip().lstrip("#")
    if len(digits) != 6:
        raise ValueError(f"expected a colour such as #000000, got {text!r}")
    return int(digits, 16)


def color_text(value: int) -> str:
    """What :func:`color` reads back as ``value``."""
    return f"#{value:06x}"


def margin(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(f"must be a fraction between 0 and 1 (e.g. 0.05), got {text}")
    return value


def cidr(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise ValueError(f"expected a CIDR range such as 10.0.0.0/8, got {text!r}") from exc


def gs_uri(text: str) -> str:
    from api.results import parse_gs_uri

    parse_gs_uri(text)
    return text


def signing_lifetime(text: str) -> int:
    from api.signing import lifetime

    return lifetime(text)


def leeway(text: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_LEEWAY:
        raise ValueError(f"must be between 0 and {MAX_LEEWAY:g} seconds, got {text}")
    return value


def source_port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(f"must be 1-65535, got {value}")
    return value


def limit_string(text: str) -> str:
    """Limits notation such as ``20/second;600/minute``, checked now rather than at first use."""
    from limits import parse_many

    parse_many(text)
    return text


@dataclass(frozen=True)
class ApiSettings:
    listen: str = "0.0.0.0:50051"
    processor: str = "127.0.0.1:50052"
    processor_ca: str | None = None
    processor_cert: str | None = None
    processor_key: str | None = None
    processor_server_name: str | None = None
    processor_insecure: bool = False
    processor_bytes_in_flight: int = 64 * 1024 * 1024
    target_size: tuple[int, int] = (1024, 768)
    grayscale: bool = True
    margin: float = 0.05
    fit: str = "pad"
    pad_color: int = 0x000000
    format: str = "jpeg"
    quality: int = 85
    max_input_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 64_000_000
    fetch_timeout: float = 20.0
    fetch_connect_timeout: float = 3.0
    fetch_max_redirects: int = 3
    allow_source_cidr: tuple[Network, ...] = ()
    allow_source_port: tuple[int, ...] = (80, 443)
    deadline: float = 30.0
    max_deadline: float = 120.0
    auth: str = "jwt"
    jwks: str | None = None
    issuer: str = "imagescaler-admin"
    audience: str = "imagescaler"
    tenants: str | None = None
    token_algorithms: tuple[str, ...] = ("EdDSA",)
    token_leeway: float = 30.0
    max_token_lifetime: float = 86400.0
    revocations: str = "memory://"
    ratelimit_storage: str = "memory://"
    ratelimit_strategy: str = "sliding-window-counter"
    ratelimit_default: str = "50/second;3000/minute"
    pixel_limit_default: str = "2000/minute"
    max_concurrent_per_tenant: int = 16
    ratelimit_failure: str = "open"
    ratelimit_timeout: float = 0.1
    result_store: str | None = None
    result_url_lifetime: int = 900
    result_signing_key: str | None = None
    result_signing_email: str | None = None
    result_fallback_inline: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int = 5001
    probe_listen: str | None = None
    workers: int = 64
    max_concurrent_rpcs: int = 64
    grace: float = 25.0
    drain_delay: float = 1.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_input_bytes > opt.MAX_INPUT_BYTES:
            raise ValueError("--max-input-bytes: at most 1GB (gRPC's message limit is 2 GB)")
        if Image.MAX_IMAGE_PIXELS and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"--max-pixels: at most {Image.MAX_IMAGE_PIXELS}")
        client_tls = (self.processor_ca, self.processor_cert, self.processor_key)
        if self.processor_insecure and any(client_tls):
            raise ValueError(
                "--processor-insecure: cannot be combined with --processor-ca/cert/key"
            )
        if not self.processor_insecure and not all(client_tls):
            raise ValueError(
                "--processor-ca, --processor-cert and --processor-key are required for mutual "
                "TLS to the processor (or --processor-insecure for development)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.auth == "jwt" and not (self.jwks and self.tenants):
            raise ValueError("--jwks and --tenants are required with --auth jwt")
        if not (self.issuer and self.audience):
            raise ValueError("--issuer and --audience must not be empty")
        if self.deadline > self.max_deadline:
            raise ValueError("--deadline: must not exceed --max-deadline")
        width, height = self.target_size
        side = min(MAX_SIDE, imaging.max_side(self.format))
        if max(width, height) > side or width * height > self.max_pixels:
            # else every scaled call is refused, as if the caller's image were at fault
            raise ValueError(
                f"--target-size: {width}x{height} is beyond what {self.format} output allows "
                f"({side} a side) or --max-pixels ({self.max_pixels})"
            )
        scheme, sep, _ = self.ratelimit_storage.partition("://")
        if not sep or scheme not in RATELIMIT_SCHEMES:  # else a traceback at build_server
            schemes = ", ".join(f"{s}://" for s in RATELIMIT_SCHEMES)
            raise ValueError(f"--ratelimit-storage: expected one of {schemes}")
        if scheme in ("redis", "rediss") and not redis_url_parses(self.ratelimit_storage):
            # a password with / ? # unescaped: the limiter would fail open on every call
            raise ValueError(
                "--ratelimit-storage: not a URL redis-py can parse (percent-encode / ? # in "
                "the password)"
            )
        if not revocation_store_supported(self.revocations):
            raise ValueError("--revocations: expected memory://, redis://, rediss:// or unix://")

    def public(self) -> dict[str, object]:
        """The effective configuration for the startup log (file paths, never contents)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["allow_source_cidr"] = [str(n) for n in self.allow_source_cidr]
        values["pad_color"] = color_text(self.pad_color)
        for key in ("ratelimit_storage", "revocations", "result_store"):
            values[key] = _redact(values[key])
        return values


def default_api_workers() -> int:
    """Threads, and calls admitted at once: several tenants at their in-flight cap (16).

    Admitting more calls than there are threads queues them unseen (docs/reliability.md:
    at 3x capacity, 16 threads with 256 admitted calls gave a 10 s p99 and +300 MB RSS).
    """
    return max(64, 8 * default_workers())


SECRET_PARAMETERS = frozenset({"password", "sentinel_password"})


def _redact(uri: object) -> object:
    """Drop credentials from a storage URI: ``redis://user:secret@host`` and the query
    parameters redis-py and `limits` also take them from (``?password=secret``)."""
    if not isinstance(uri, str):
        return uri
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:  # up to the last @, whatever a password holds (even / ? #)
        uri = f"{scheme}{sep}***@{rest.rpartition('@')[2]}"
    head, mark, query = uri.partition("?")
    params = [
        f"{p.partition('=')[0]}=***" if p.partition("=")[0].lower() in SECRET_PARAMETERS else p
        for p in query.split("&")
    ]
    return head + mark + "&".join(params)


def build_options() -> opt.Options:
    o = opt.Options("imagescaler-api", "The imagescaler public gRPC API.")
    add = o.add
    add(
        "listen",
        "0.0.0.0:50051",
        "address to serve the public gRPC API on",
        opt.host_port,
        "HOST:PORT",
    )
    add(
        "processor",
        "127.0.0.1:50052",
        "processor gRPC target, e.g. dns:///processor:50052",
        metavar="TARGET",
    )
    add(
        "processor-ca", None, "CA that signs the processor's certificate", opt.existing_file, "FILE"
    )
    add(
        "processor-cert",
        None,
        "client certificate presented to the processor",
        opt.existing_file,
        "FILE",
    )
    add("processor-key", None, "client private key", opt.existing_file, "FILE")
    add(
        "processor-server-name",
        None,
        "name expected in the processor's certificate",
        metavar="NAME",
    )
    add("processor-insecure", False, "plaintext to the processor, for development", kind="bool")
    add(
        "processor-bytes-in-flight",
        64 * 1024 * 1024,
        "request bytes this replica has out at the processors at once; calls beyond it wait "
        "(a processor receives whole requests however busy it is: size its memory for the "
        "API replicas times this)",
        opt.byte_size,
        "BYTES",
        show=opt.byte_size_text,
    )
    add("target-size", (1024, 768), "output size", opt.size, "WxH", show=opt.size_text)
    add("grayscale", True, "convert to grayscale", kind="bool")
    add(
        "margin",
        0.05,
        "images within this fraction of the target on both sides are not rescaled",
        margin,
        "FRACTION",
    )
    add(
        "fit",
        "pad",
        "how to fit the target: pad (letterbox, nothing lost), fill (centre "
        "crop), fit (inside the box), stretch",
        opt.choice(*FITS),
        "MODE",
    )
    add("pad-color", 0, "letterbox colour for --fit pad", color, "#RRGGBB", show=color_text)
    add("format", "jpeg", "output format: jpeg, png or webp", opt.choice(*FORMATS), "FORMAT")
    add("quality", 85, "JPEG/WebP quality 1-100", opt.quality, "Q")
    add(
        "max-input-bytes",
        32 * 1024 * 1024,
        "largest accepted image, inline or fetched",
        opt.byte_size,
        "BYTES",
        show=opt.byte_size_text,
    )
    add("max-pixels", 64_000_000, "largest accepted declared pixel count", opt.positive_int, "N")
    add("fetch-timeout", 20.0, "total seconds for fetching a URL source", opt.positive_float, "S")
    add("fetch-connect-timeout", 3.0, "seconds to connect to a URL source", opt.positive_float, "S")
    add("fetch-max-redirects", 3, "redirects followed for a URL source", opt.non_negative_int, "N")
    add(
        "allow-source-cidr",
        [],
        "address range URL sources may use despite the private/loopback block",
        cidr,
        "CIDR",
        kind="list",
    )
    add(
        "allow-source-port",
        [80, 443],
        "ports URL sources may use on public addresses (any port inside --allow-source-cidr)",
        source_port,
        "PORT",
        kind="list",
    )
    add(
        "deadline",
        30.0,
        "deadline for calls that set none (also bounds the wait for the request body)",
        opt.seconds,
        "SECONDS",
    )
    add("max-deadline", 120.0, "cap on any call's deadline", opt.seconds, "SECONDS")
    add("auth", "jwt", "jwt, or none (legacy/development only)", opt.choice("jwt", "none"), "MODE")
    add("jwks", None, "JWKS file with the token verification keys", metavar="FILE")
    add("issuer", "imagescaler-admin", "required token issuer (iss)", metavar="ISS")
    add("audience", "imagescaler", "required token audience (aud)", metavar="AUD")
    add("tenants", None, "tenant registry file (YAML or JSON)", metavar="FILE")
    add(
        "token-algorithms",
        ["EdDSA"],
        "accepted token signature algorithms (EdDSA, ES256, "
        "RS256); HMAC and none are always refused",
        opt.choice("EdDSA", "ES256", "RS256"),
        "ALG",
        kind="list",
    )
    add("token-leeway", 30.0, "clock skew allowed on exp/nbf/iat (0-300)", leeway, "SECONDS")
    add(
        "max-token-lifetime",
        86400.0,
        "tokens with a longer exp - iat are refused",
        opt.positive_float,
        "SECONDS",
    )
    add(
        "revocations",
        "memory://",
        "where token revocations live: memory://, or redis://, rediss:// or unix:// (redis-py)",
        metavar="URI",
    )
    add(
        "ratelimit-storage",
        "memory://",
        "rate-limit counters: memory:// or redis://...",
        metavar="URI",
    )
    add(
        "ratelimit-strategy",
        "sliding-window-counter",
        "sliding-window-counter (2 Redis keys per limit), moving-window (exact, one sorted "
        "set entry per request) or fixed-window (1 key, bursts of twice the limit at a window's "
        "edge)",
        opt.choice("sliding-window-counter", "moving-window", "fixed-window"),
        "NAME",
    )
    add(
        "ratelimit-default",
        "50/second;3000/minute",
        "request limits of tenants that set none (limits notation)",
        limit_string,
        "LIMITS",
    )
    add(
        "pixel-limit-default",
        "2000/minute",
        "megapixels of input per period for tenants that set none",
        limit_string,
        "LIMITS",
    )
    add(
        "max-concurrent-per-tenant",
        16,
        "in-flight requests per tenant per replica (tenants may set their own)",
        opt.positive_int,
        "N",
    )
    add(
        "ratelimit-failure",
        "open",
        "when the rate-limit store fails: open (serve, count the failure) or closed (UNAVAILABLE)",
        opt.choice("open", "closed"),
        "POLICY",
    )
    add(
        "ratelimit-timeout",
        0.1,
        "seconds of rate-limit store time per request, all windows together",
        opt.positive_float,
        "SECONDS",
    )
    add(
        "result-store",
        None,
        "store results and return signed URLs: gs://BUCKET/PREFIX",
        gs_uri,
        "URI",
    )
    add(
        "result-url-lifetime",
        900,
        "seconds a signed result URL works (at most 604800, GCS's limit)",
        signing_lifetime,
        "SECONDS",
    )
    add(
        "result-signing-key",
        None,
        "service-account JSON key that signs URLs; without it, signing goes through IAM "
        "signBlob as the pod's Workload Identity",
        opt.existing_file,
        "FILE",
    )
    add(
        "result-signing-email",
        None,
        "service account that signs through IAM signBlob (default: the pod's own)",
        metavar="EMAIL",
    )
    add(
        "result-fallback-inline",
        False,
        "when storage fails, deliver the result inline (reply says so) instead of UNAVAILABLE",
        kind="bool",
    )
    add("tls-cert", None, "certificate for TLS on the public listener", opt.existing_file, "FILE")
    add("tls-key", None, "private key for TLS on the public listener", opt.existing_file, "FILE")
    add(
        "probe-listen",
        None,
        "plaintext port serving only the health service, for Kubernetes gRPC probes when the "
        "public listener uses TLS",
        opt.host_port,
        "HOST:PORT",
    )
    add(
        "metrics-port",
        5001,
        "Prometheus /metrics port (0 turns metrics off); served on the --listen host if "
        "that is loopback, else on all interfaces",
        opt.port,
        "PORT",
    )
    add(
        "workers",
        default_api_workers(),
        "request threads (mostly waiting on I/O); keep well above --max-concurrent-per-tenant "
        "so one tenant's slow calls cannot hold them all",
        opt.positive_int,
        "N",
    )
    add(
        "max-concurrent-rpcs",
        default_api_workers(),
        "in-flight RPCs per replica before RESOURCE_EXHAUSTED; at most --workers, or calls "
        "beyond it wait for a thread instead of being refused",
        opt.positive_int,
        "N",
    )
    o.add_lifecycle()
    return o


def load(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ApiSettings:
    """Build settings from flags, environment and config file; exit 2 naming a bad option."""
    return build_options().build(ApiSettings, argv, environ)
