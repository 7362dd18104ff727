# egress-gateway container image.
#
#   docker build -t registry.example.com/platform/egress-gateway:0.1.0 .
#   (daemonless: buildah bud --isolation chroot --storage-driver vfs -t ... . ; .ci/build-image builds and runs it)
#
# Two stages: the first installs the locked dependencies (image/requirements.lock: every package pinned, every file
# hash-checked) and the package into a virtualenv, then removes pip, setuptools, wheel and mitmproxy's web UI
# assets from it; the second copies only that virtualenv onto a clean base and runs as an unprivileged user.
# The Helm chart runs it with a read-only root filesystem; /var/lib/egress-gateway and /tmp are volumes there.
#
# Base: python:3.12.12-slim-bookworm pinned by its index digest. That digest was not pulled here (no registry is
# reachable from where this was written): it is the one public Dockerfiles pin for that tag. Check it with
# `docker buildx imagetools inspect python:3.12.12-slim-bookworm` and bump both together. Any Debian-like base
# with python3 (>= 3.12, < 3.14) and python3-venv works: CI builds on a Debian trixie base (Python 3.13) made
# with mmdebstrap, passed as --build-arg PYTHON_IMAGE=...
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/egress-gateway
COPY image/requirements.lock ./
# Dependencies first (their layer survives code changes), each file checked against the lock's sha256.
RUN /opt/egress-gateway/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY egress_gateway ./egress_gateway
# The package itself, built with the locked setuptools (no build isolation, so nothing unlocked is fetched);
# `pip check` proves the lock covers its dependencies and --version that the entry point works. Then the
# installer and the web UI's static files (mitmweb; the gateway never serves them) leave the virtualenv.
RUN /opt/egress-gateway/bin/pip install --no-deps --no-build-isolation . \
    && /opt/egress-gateway/bin/pip check \
    && /opt/egress-gateway/bin/egress-gateway --version \
    && /opt/egress-gateway/bin/python -m pip uninstall --yes setuptools wheel pip \
    && rm -rf /opt/egress-gateway/lib/python3*/site-packages/mitmproxy/tools/web/static

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="egress-gateway" \
      org.opencontainers.image.description="Kubernetes egress gateway: per-namespace EgressPolicy enforcement without TLS interception" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base's own pip goes too (python:*-slim ships one): nothing at run time installs packages.
RUN groupadd --system --gid 10001 egress \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/egress-gateway --no-create-home \
       --shell /usr/sbin/nologin egress \
    && mkdir -p /var/lib/egress-gateway /etc/egress-gateway \
    && chown 10001:10001 /var/lib/egress-gateway \
    && (python3 -m pip uninstall --yes --break-system-packages pip >/dev/null 2>&1 || true)
COPY --from=build /opt/egress-gateway /opt/egress-gateway
ENV PATH=/opt/egress-gateway/bin:$PATH \
    HOME=/var/lib/egress-gateway \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/egress-gateway
USER 10001:10001
# 3128: proxy; 9901: admin (/healthz, /readyz, /metrics).
EXPOSE 3128 9901
ENTRYPOINT ["egress-gateway", "run"]
CMD ["--config", "/etc/egress-gateway/config.yaml"]
