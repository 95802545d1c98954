"""The exporter's metrics about itself: health, collectors, sampling, configuration, web server
and process. The sampler emits them; docs/metrics.md lists them from here."""

from __future__ import annotations

from exporter.collectors import MetricSpec


def _spec(
    name: str, type_: str, help_: str, labels: tuple[str, ...] = (), unit: str = ""
) -> MetricSpec:
    return MetricSpec(
        name, type_, help_, labels=labels, unit=unit, per_device=False, source="exporter"
    )


NVML_UP = _spec("nvml_up", "gauge", "1 if NVML is initialised and devices were enumerated.")
GPU_UP = MetricSpec(
    "nvml_gpu_up",
    "gauge",
    "1 if the GPU answered this sample; 0 if it is lost, needs a reset or timed out.",
    source="exporter (GPU_IS_LOST, RESET_REQUIRED, sample deadline)",
)
GPU_DOWN = MetricSpec(
    "nvml_gpu_down_info",
    "info",
    "Why a GPU is down: gpu_is_lost, reset_required, gpu_not_found, timeout (a read missed the "
    "sample deadline), or the error that kept it from opening; only while down. Always 1.",
    labels=("reason",),
    source="exporter",
)
GPU_LAST_SAMPLE = MetricSpec(
    "nvml_gpu_last_sample_timestamp_seconds",
    "gauge",
    "Unix time this GPU was last read successfully; time() minus this is its data's age.",
    unit="seconds",
    source="exporter",
)
GPU_DEVICES = _spec(
    "nvml_gpu_devices", "gauge", "GPUs NVML reports on this host, before device selection."
)
COLLECTOR_SUCCESS = _spec(
    "nvml_collector_success",
    "gauge",
    "1 if the collector ran without errors on every device in the last sample.",
    ("collector",),
)
COLLECTOR_DURATION = _spec(
    "nvml_collector_duration_seconds",
    "gauge",
    "Time the collector took in the last sample, summed over devices.",
    ("collector",),
    "seconds",
)
COLLECTOR_ERRORS = _spec(
    "nvml_collector_errors_total",
    "counter",
    "Failed reads by collector and kind: an NVML error name (unsupported values are not "
    "errors) or `exception` for a bug.",
    ("collector", "error"),
)
LAST_SAMPLE = _spec(
    "nvml_last_sample_timestamp_seconds",
    "gauge",
    "Unix time the last sample completed; values are as fresh as this.",
    unit="seconds",
)
SAMPLE_DURATION = _spec("nvml_sample_duration_seconds", "gauge", "Wall time the last sample took.")
BUILD_INFO = _spec(
    "nvml_exporter_build_info",
    "info",
    "Version of the exporter and its NVML binding; always 1.",
    ("version", "python_version", "binding_version"),
)
BACKEND_INFO = _spec(
    "nvml_exporter_backend_info",
    "info",
    "Which backend produced the data: nvml, or simulated for demos and tests; always 1.",
    ("backend",),
)
RELOAD_SUCCESS = _spec(
    "nvml_exporter_config_last_reload_successful",
    "gauge",
    "1 if the last configuration reload succeeded (or none was attempted).",
)
RELOAD_TIMESTAMP = _spec(
    "nvml_exporter_config_last_reload_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful configuration load.",
    unit="seconds",
)


def _process_spec(name: str, type_: str, help_: str, unit: str = "") -> MetricSpec:
    return MetricSpec(
        name, type_, help_, unit=unit, per_device=False, source="/proc/self (prometheus_client)"
    )


# Emitted by prometheus_client's ProcessCollector; listed so docs/metrics.md covers them.
PROCESS_METRICS = (
    _process_spec("process_cpu_seconds_total", "counter", "CPU time the exporter used.", "seconds"),
    _process_spec("process_resident_memory_bytes", "gauge", "Resident memory.", "bytes"),
    _process_spec("process_virtual_memory_bytes", "gauge", "Virtual memory.", "bytes"),
    _process_spec(
        "process_start_time_seconds", "gauge", "Unix time the process started.", "seconds"
    ),
    _process_spec("process_open_fds", "gauge", "Open file descriptors."),
    _process_spec("process_max_fds", "gauge", "Limit on open file descriptors."),
)

SAMPLE_FAILURES = _spec(
    "nvml_exporter_sample_failures_total",
    "counter",
    "Samples that failed with an unexpected error (a bug); the previous data stays served.",
)

WEB_RELOAD_SUCCESS = _spec(
    "nvml_exporter_web_config_last_reload_successful",
    "gauge",
    "1 if the web config file (TLS, basic auth) and the files it names were last loaded "
    "without error; 0 while a broken change is refused and the previous settings serve.",
)
CERTIFICATE_EXPIRY = _spec(
    "nvml_exporter_tls_certificate_expiry_timestamp_seconds",
    "gauge",
    "Unix time the serving TLS certificate expires (its notAfter); alert on it minus time().",
    unit="seconds",
)
# Only with web.config_file (the second only with TLS).
WEB_METRICS = (WEB_RELOAD_SUCCESS, CERTIFICATE_EXPIRY)

SELF_METRICS = (
    NVML_UP,
    GPU_UP,
    GPU_DOWN,
    GPU_LAST_SAMPLE,
    GPU_DEVICES,
    COLLECTOR_SUCCESS,
    COLLECTOR_DURATION,
    COLLECTOR_ERRORS,
    LAST_SAMPLE,
    SAMPLE_DURATION,
    BUILD_INFO,
    BACKEND_INFO,
    RELOAD_SUCCESS,
    RELOAD_TIMESTAMP,
    SAMPLE_FAILURES,
)
