# One image for the API, the processor and the tools; each Deployment picks its command
# (imagescaler-api is the default). Build: docker build -t imagescaler:0.1.0 .
#
# tests/deploy/test_wheel.py repeats the install step below (pip wheel, then pip install with
# constraints.txt into a fresh venv) and runs every console script's --help, because Docker
# cannot build on the development machines; tests/deploy/test_dockerfile.py checks the shape.

# Pinned by tag; pin by digest too (python:3.11.14-slim-bookworm@sha256:...) for reproducible
# builds in CI. Both stages must use the same base: the venv's interpreter path points into it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: build our wheel and install it with pinned dependencies into a venv ----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY api/ api/
COPY processor/ processor/
COPY auth/ auth/
COPY tools/ tools/

# Every dependency ships a manylinux wheel, so no compiler is needed even here; should one
# ever need building, install build-essential in this stage only.
RUN python -m pip wheel --no-deps --wheel-dir /tmp/dist . \
    && python -m venv /opt/imagescaler \
    && /opt/imagescaler/bin/pip install --no-cache-dir --constraint constraints.txt \
        /tmp/dist/imagescaler-*.whl

# --- runtime: the venv only, no build tools, non-root -------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="imagescaler" \
      org.opencontainers.image.description="Multi-tenant gRPC image scaling for ML pipelines"

# A named user for tools that look one up; Kubernetes runs as the same numeric ids.
RUN groupadd --system --gid 10001 imagescaler \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin imagescaler

COPY --from=builder /opt/imagescaler /opt/imagescaler

# HOME=/tmp: the root filesystem is read-only in Kubernetes and /tmp is an emptyDir there.
# GRPC_VERBOSITY=ERROR: refused mTLS handshakes are otherwise logged loudly by gRPC core.
# MALLOC_*: measured by imagescaler-bench (docs/benchmarks.md): receiving a 2.45 MB message
# over mTLS fell from 5.3 to 2.9 ms of CPU, the API's CPU per 12 MP image from ~14.5 to ~10 ms,
# and RSS per concurrent request from ~25 to ~18 MB. Set all three: setting either threshold
# alone turns off glibc's dynamic thresholds and is worse. The mmap threshold (16 MiB) keeps
# photo-sized buffers on the heap and gives bodies near --max-input-bytes back when freed: 12
# concurrent 31 MiB uploads left the API at ~310 MiB instead of ~800 (docs/reliability.md 14).
ENV PATH=/opt/imagescaler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRPC_VERBOSITY=ERROR \
    HOME=/tmp \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=16777216 \
    MALLOC_TRIM_THRESHOLD_=268435456

USER 10001:10001
# 50051 API gRPC (TLS), 50054 API probes, 5001 API metrics; 50052 processor mTLS,
# 50053 processor probes, 5002 processor metrics (the containerPorts in manifests/base).
EXPOSE 50051 50054 5001 50052 50053 5002
ENTRYPOINT ["imagescaler-api"]
