"""nvml-exporter: a Prometheus exporter for NVIDIA GPUs built on NVML."""

__version__ = "0.1.0"
