# syntax=docker/dockerfile:1
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# The kubernetes extra brings grpcio for the kubelet's pod-resources socket.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir "$(ls /wheels/*.whl)[kubernetes]"

FROM python:3.12-slim
LABEL org.opencontainers.image.title="nvml-exporter" \
      org.opencontainers.image.description="Prometheus exporter for NVIDIA GPUs via NVML" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility \
    PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /venv /venv
COPY config/exporter.yaml /etc/nvml-exporter/exporter.yaml
RUN useradd --system --uid 65532 --no-create-home nvml-exporter
USER 65532
EXPOSE 9471
# No curl in the image: Python asks /healthz. It assumes the default plain-HTTP port; with a
# different listen address or TLS, override the health check (Kubernetes uses its own probes).
HEALTHCHECK --interval=30s --timeout=3s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9471/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["nvml-exporter"]
CMD ["--config.file", "/etc/nvml-exporter/exporter.yaml"]
