"""The server processes' environment as the container image sets it (see ``Dockerfile``).

The demo and the benchmark start servers with it so that what they show is what runs in
production; a test keeps it equal to the Dockerfile's ``ENV``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# glibc: one multi-MB message buffer per call is otherwise a fresh mmap (page faults, zeroing,
# munmap) or a heap grow-and-trim; docs/benchmarks.md has the numbers.
ALLOCATOR = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "16777216",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
}
SERVER = {"GRPC_VERBOSITY": "ERROR", **ALLOCATOR}


def server_env(extra: Iterable[str] = (), *, deployed: bool = True) -> dict[str, str]:
    """This process's environment plus the container's settings and ``KEY=VALUE`` overrides."""
    env = {**os.environ, **(SERVER if deployed else {"GRPC_VERBOSITY": "ERROR"})}
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env
