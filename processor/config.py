"""The processor's settings: one frozen object built and validated once at startup."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from processor import memory, tls
from processor import options as opt


def default_workers() -> int:
    """Cores this process may run on (not the host's count, which containers inherit)."""
    return len(os.sched_getaffinity(0))


STREAM_THREADS = 32


@dataclass(frozen=True)
class ProcessorSettings:
    listen: str = "127.0.0.1:50052"
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    allow_client: tuple[str, ...] = ()
    probe_listen: str | None = None
    metrics_port: int = 5002
    workers: int = 2
    queue: int = 8
    max_input_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 64_000_000
    memory_budget: int = memory.DEFAULT_BUDGET
    max_connection_age: float = 300.0
    grace: float = 25.0
    drain_delay: float = 1.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_input_bytes > opt.MAX_INPUT_BYTES:
            raise ValueError("--max-input-bytes: at most 1GB (gRPC's message limit is 2 GB)")
        if Image.MAX_IMAGE_PIXELS and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"--max-pixels: at most {Image.MAX_IMAGE_PIXELS} (Pillow's bomb limit)"
            )
        files = (self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.insecure and any(files):
            raise ValueError("--insecure: cannot be combined with --tls-cert/--tls-key")
        if not self.insecure and not all(files):
            raise ValueError(
                "--tls-cert, --tls-key and --tls-client-ca are required (or --insecure for "
                "development on loopback)"
            )
        if self.insecure:
            tls.refuse_non_loopback(self.listen)
        if self.allow_client and self.insecure:
            raise ValueError("--allow-client: needs mutual TLS (client identities come from it)")

    @property
    def threads(self) -> int:
        """Workers and queued calls, plus threads for health checks and the API's health
        watches (each watch holds a thread in gRPC's sync server for its lifetime)."""
        return self.workers + self.queue + STREAM_THREADS


def build_options() -> opt.Options:
    o = opt.Options("imagescaler-processor", "The imagescaler processor: decodes, scales, encodes.")
    o.add("listen", "127.0.0.1:50052", "address to serve gRPC on", opt.host_port, "HOST:PORT")
    o.add("insecure", False, "plaintext, for development; loopback addresses only", kind="bool")
    o.add("tls-cert", None, "server certificate (PEM) for mutual TLS", opt.existing_file, "FILE")
    o.add("tls-key", None, "server private key (PEM)", opt.existing_file, "FILE")
    o.add(
        "tls-client-ca",
        None,
        "CA that signs allowed client certificates",
        opt.existing_file,
        "FILE",
    )
    o.add(
        "allow-client",
        [],
        "client identity (a certificate SAN; the CN if it has none) allowed to call",
        metavar="NAME",
        kind="list",
    )
    o.add(
        "probe-listen",
        None,
        "plaintext port serving only the health service, for Kubernetes gRPC probes",
        opt.host_port,
        "HOST:PORT",
    )
    o.add(
        "metrics-port",
        5002,
        "Prometheus /metrics port (0 turns metrics off); served on the --listen host if "
        "that is loopback, else on all interfaces",
        opt.port,
        "PORT",
    )
    o.add(
        "workers",
        default_workers(),
        "concurrent images (threads); default: usable cores",
        opt.positive_int,
        "N",
    )
    o.add(
        "queue",
        8,
        "requests that may wait for a worker before new ones are refused",
        opt.non_negative_int,
        "N",
    )
    o.add(
        "max-input-bytes",
        32 * 1024 * 1024,
        "largest accepted image (e.g. 32MB)",
        opt.byte_size,
        "BYTES",
        show=opt.byte_size_text,
    )
    o.add("max-pixels", 64_000_000, "largest accepted declared pixel count", opt.positive_int, "N")
    o.add(
        "memory-budget",
        memory.DEFAULT_BUDGET,
        "estimated decode memory the images in work may hold together (e.g. 320MB): an image "
        "needing more is refused for good, one not fitting beside the others as at capacity",
        opt.byte_size,
        "BYTES",
        show=opt.byte_size_text,
    )
    o.add(
        "max-connection-age",
        300.0,
        "seconds before clients must reconnect (and re-resolve)",
        opt.seconds,
        "SECONDS",
    )
    o.add_lifecycle()
    return o


def load(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ProcessorSettings:
    """Build settings from flags, environment and config file; exit 2 naming a bad option."""
    return build_options().build(ProcessorSettings, argv, environ)
