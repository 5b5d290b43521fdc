# syntax=docker/dockerfile:1
# Images of the four FIBEMRSS services, one build target each (one process per image:
# python -m services.<module>). Build from the repository root, which is the build context, after
# preparing the wheelhouse (the build installs from it and needs no network):
#   bash deploy/images/wheelhouse.sh            # var/wheelhouse: the project's wheel + its deps
#   docker build --target emr-gateway    -t fibemrss-emr-gateway:0.1.0 .
#   docker build --target hospital-agent -t fibemrss-hospital-agent:0.1.0 .
#   docker build --target aggregator     -t fibemrss-aggregator:0.1.0 .
#   docker build --target inference      -t fibemrss-inference:0.1.0 .
# or simply `make images` (podman or docker; see docs/runbook.md, "Images").
# Always pass --target: without it Docker builds the last stage only. The virtualenv is built
# once (stage build) and shared by every image through the runtime stage: one identical layer
# in all four.
# BASE_IMAGE: any Debian 12 image with python3 3.11 and venv; `make images` on a machine without
# a registry builds localhost/fibemrss-base:bookworm from Debian packages
# (deploy/images/build_base.sh).
# Runtime configuration comes only from environment variables and mounted Secrets
# (see docs/runbook.md); nothing secret is baked into the images.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Marks the build stage's images, so that `make images` removes the ones no build uses any more.
LABEL org.fibemrss.stage="build"
# The wheelhouse (deploy/images/wheelhouse.sh): the project is installed from its own wheel, never
# from source folders, so the image follows the package layout that pyproject.toml declares.
# torch is pinned to 2.13.0 (CPU) by constraints.txt.
ARG WHEELHOUSE=var/wheelhouse
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INDEX=1
COPY ${WHEELHOUSE}/ /wheels/
# torch's C++ headers, C++ test binaries and bundled protoc are for building and testing
# torch itself, not for running it (torch/bin/torch_shm_manager stays). No .pyc is written
# (--no-compile): the root filesystem is read-only and they would only add size.
WORKDIR /opt/venv/lib/python3.11/site-packages/torch
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile --find-links /wheels fibemrss==0.1.0 \
 && rm -rf include test share/cmake bin/*Test bin/protoc* bin/test_*

# Everything the four images share; each target below adds only its labels and CMD.
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.version="0.1.0"
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 fibemrss \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin fibemrss
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in Kubernetes: caches and temporary files go to /tmp
# (an emptyDir there), and no .pyc is written at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    FIBEMRSS_LISTEN=0.0.0.0:50051 \
    FIBEMRSS_METRICS_LISTEN=0.0.0.0:9464 \
    FIBEMRSS_HEALTH_LISTEN=0.0.0.0:8081
WORKDIR /tmp
USER 10001:10001
# 50051: gRPC (mutual TLS; grpc.health.v1 and reflection), 9464: Prometheus /metrics,
# 8081: plaintext grpc.health.v1 only, for the kubelet's probes.
EXPOSE 50051 9464 8081
# The services drain in-flight calls on SIGTERM (allow 30 s).
STOPSIGNAL SIGTERM
# No HEALTHCHECK: every gRPC port requires a client certificate, so a check inside the image
# would need the mounted TLS files; Kubernetes' gRPC probes do this job (see the Helm chart).

FROM runtime AS emr-gateway
LABEL org.opencontainers.image.title="fibemrss-emr-gateway" \
      org.opencontainers.image.description="FIBEMRSS emr_gateway service"
CMD ["python", "-m", "services.emr_gateway"]

FROM runtime AS hospital-agent
LABEL org.opencontainers.image.title="fibemrss-hospital-agent" \
      org.opencontainers.image.description="FIBEMRSS hospital_agent service"
CMD ["python", "-m", "services.hospital_agent"]

FROM runtime AS aggregator
LABEL org.opencontainers.image.title="fibemrss-aggregator" \
      org.opencontainers.image.description="FIBEMRSS aggregator service"
CMD ["python", "-m", "services.aggregator"]

FROM runtime AS inference
LABEL org.opencontainers.image.title="fibemrss-inference" \
      org.opencontainers.image.description="FIBEMRSS inference service"
CMD ["python", "-m", "services.inference"]
