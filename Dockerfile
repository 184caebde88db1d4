# syntax=docker/dockerfile:1
# apigee-authz: the Envoy ext_authz service (gRPC :5000, metrics and health :5001).
#
#   docker build -t apigee-authz .
#   docker run --rm -v "$PWD/config.yaml:/config/config.yaml:ro" -p 5000:5000 -p 5001:5001 apigee-authz
#   docker run --rm apigee-authz render envoy --authz 10.0.0.10:5000    # prints an Envoy config
#
# Layout (the same paths as the Go adapter's samples; deploy/README.md mounts them on Kubernetes):
#   /config/config.yaml   the config (plain YAML or the multi-document stream `provision` prints)
#   /policy-secret        remote-service.crt, .key, .properties (Apigee X/hybrid)
#   /analytics-secret     client_secret.json (optional; without it, Workload Identity / ADC)
#   /catalog/catalog.yaml standalone mode's local catalog (tenant.catalog_file)
#   /tmp/apigee-istio     global.temp_dir: the analytics buffer (writable; a volume)
#
# Both stages use the same pinned base, so the venv's interpreter path (/usr/local/bin/python3.11) exists
# in the final image. Every runtime dependency ships manylinux wheels (grpcio, cryptography, httptools,
# pyyaml), so the builder needs no compiler either; it only runs pip.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel needs: the package metadata (pyproject.toml names README.md as the long description)
# and the package. Runtime dependencies only: the `test` extra is not installed.
COPY pyproject.toml README.md ./
COPY authz ./authz
# A venv without pip of its own; the base image's pip installs into it (--python). pip compiles the .pyc
# files here, because the final image's root filesystem is read-only at run time.
RUN python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --compile . \
 && /opt/venv/bin/authz --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="apigee-authz" \
      org.opencontainers.image.description="Envoy ext_authz service for Apigee API keys and products"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUTHZ_ENVOY_TEMPLATES=/usr/share/apigee-authz/envoy
# No pip, setuptools or wheel at run time (the venv never had them; the base image's copies go too).
# One non-root user, uid/gid 65532, and the mount points it needs.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && rm -rf /root/.cache \
 && groupadd --gid 65532 authz \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin authz \
 && mkdir -p /config /policy-secret /analytics-secret /catalog /tmp/apigee-istio \
 && chown 65532:65532 /tmp/apigee-istio
COPY --from=builder /opt/venv /opt/venv
# The Envoy config templates `authz render envoy` fills in (AUTHZ_ENVOY_TEMPLATES points here).
COPY envoy/ /usr/share/apigee-authz/envoy/
USER 65532:65532
VOLUME ["/tmp/apigee-istio"]
EXPOSE 5000 5001
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5001/livez', timeout=2)"]
ENTRYPOINT ["authz"]
CMD ["serve", "--config", "/config/config.yaml"]
