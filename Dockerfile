# egress-gateway container image.
#
#   docker build -t registry.example.com/platform/egress-gateway:0.1.0 .
#
# Two stages: the first installs the package and its runtime dependencies (no test extras) into a virtualenv,
# the second copies only that virtualenv onto a clean python:3.12-slim and runs as an unprivileged user.
# The Helm chart runs it with a read-only root filesystem; /var/lib/egress-gateway and /tmp are volumes there.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/egress-gateway
COPY pyproject.toml README.md ./
COPY egress_gateway ./egress_gateway
# `pip install .` installs the runtime dependencies only (no [test] extra); --version proves the entry point works.
RUN /opt/egress-gateway/bin/pip install . \
    && /opt/egress-gateway/bin/egress-gateway --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="egress-gateway" \
      org.opencontainers.image.description="Kubernetes egress gateway: per-namespace EgressPolicy enforcement without TLS interception" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 egress \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/egress-gateway --no-create-home \
       --shell /usr/sbin/nologin egress \
    && mkdir -p /var/lib/egress-gateway /etc/egress-gateway \
    && chown 10001:10001 /var/lib/egress-gateway
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
