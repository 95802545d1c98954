"""`naming: dcgm`: dcgm-exporter's names, units and labels, for drop-in migration.

Each metric spec names the dcgm-exporter fields it stands for (`MetricSpec.dcgm`); this module
turns one device's samples into those fields, so existing dashboards and alerts keep working.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from exporter.collectors.base import Dcgm, Sample
from exporter.collectors.info import device_node
from exporter.collectors.kubernetes import POD_INFO
from exporter.config import DCGM_HOSTNAME_LABELS
from exporter.nvml import Device

DEFAULT_HOSTNAME_LABEL = DCGM_HOSTNAME_LABELS[0]
HOSTNAME_LABELS = DCGM_HOSTNAME_LABELS

# dcgm-exporter's label set on every GPU series, in its order.
IDENTITY_LABELS = (
    "gpu",
    "UUID",
    "pci_bus_id",
    "device",
    "modelName",
    DEFAULT_HOSTNAME_LABEL,
    "DCGM_FI_DRIVER_VERSION",
)

Labels = tuple[tuple[str, str], ...]
RateKey = tuple[str, str, Labels]  # GPU, our metric, our labels

# dcgm-exporter's Kubernetes labels, in the order it renders them (sorted).
POD_LABELS = ("container", "namespace", "pod")


def identity_labels(hostname_label: str = DEFAULT_HOSTNAME_LABEL) -> tuple[str, ...]:
    if hostname_label not in HOSTNAME_LABELS:
        raise ValueError(f"hostname label must be one of {HOSTNAME_LABELS}, not {hostname_label!r}")
    return tuple(hostname_label if n == DEFAULT_HOSTNAME_LABEL else n for n in IDENTITY_LABELS)


def hostname() -> str:
    """As dcgm-exporter does: the node name Kubernetes passes in, else the host's name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def identity(device: Device, host: str) -> tuple[str, ...]:
    ident = device.identity
    return (
        str(ident.index),
        ident.uuid,
        ident.pci_bus_id,
        device_node(device),
        ident.name,
        host,
        device.system.driver_version,
    )


class CounterRates:
    """The previous reading of each counter DCGM reports as a rate, per GPU; one per sampler.

    `sweep` after each sample forgets the counters that sample did not read, so the state
    cannot grow with GPUs that went away.
    """

    def __init__(self) -> None:
        self._points: dict[RateKey, tuple[float, float]] = {}
        self._seen: set[RateKey] = set()

    def rate(self, key: RateKey, value: float, now: float) -> float | None:
        """Per second since the previous reading; None on the first, or after a reset."""
        self._seen.add(key)
        previous = self._points.get(key)
        if previous is not None and now <= previous[1]:
            return None  # no time has passed: the next reading measures from the last one
        self._points[key] = (value, now)
        if previous is None or value < previous[0]:
            return None  # a counter that went down was reset (the driver reloaded)
        return (value - previous[0]) / (now - previous[1])

    def sweep(self) -> None:
        for key in self._points.keys() - self._seen:
            del self._points[key]
        self._seen = set()


def _converted(value: float, scale: float) -> float:
    """`value` in dcgm-exporter's unit. Our value was itself divided from the driver's unit
    (percent / 100, MiB * 2**20), so multiplying back carries that division's rounding error
    in the last bits (29 % comes back as 28.999999999999996): the result is rounded to the 15
    significant digits a double holds exactly."""
    if scale == 1:
        return value
    scaled = float(value) * scale
    if scaled.is_integer():
        return scaled
    return float(f"{scaled:.15g}")


@dataclass
class _Series:
    field: Dcgm
    labels: Labels
    value: float
    mig_uuid: str  # whose pods label it: the MIG device's, or the whole GPU's ("")


def _pods(samples: list[Sample]) -> dict[str, Labels]:
    """MIG UUID ("" for the whole GPU) -> dcgm-exporter's pod labels for its series.

    dcgm-exporter (without --kubernetes-virtual-gpus, its default) maps each device to one
    container, the last the kubelet lists; the holders here are sorted, so where several pods
    share a GPU the choice is the last in that order, stable from one poll to the next.
    """
    holders: dict[str, tuple[str, str, str]] = {}
    for spec, values, _ in samples:
        if spec is POD_INFO:
            named = dict(zip(spec.labels, values, strict=True))
            holders[named["mig_uuid"]] = (named["container"], named["namespace"], named["pod"])
    # In the order dcgm-exporter renders them (sorted), and only those known: an empty `pod`
    # would be filled in with the exporter's own pod by a scrape that adds target labels.
    return {
        key: tuple((k, v) for k, v in zip(POD_LABELS, who, strict=True) if v)
        for key, who in holders.items()
    }


def translate(
    samples: Iterable[Sample],
    rates: CounterRates | None = None,
    gpu: str = "",
    now: float = 0.0,
) -> list[tuple[Dcgm, Labels, float]]:
    """(field, labels beyond the identity, value in dcgm-exporter's unit) for one GPU's samples.

    `rates` keeps the counters DCGM reports as rates, keyed by `gpu` and read at `now`; without
    it those fields are left out.
    """
    samples = list(samples)
    series: list[_Series] = []
    totals: dict[Dcgm, float] = {}
    baseline: dict[Dcgm, None] = {}
    for spec, values, value in samples:
        if spec.dcgm_baseline:
            baseline.update(dict.fromkeys(spec.dcgm_baseline))
        named = dict(zip(spec.labels, values, strict=True))
        for field in spec.dcgm:
            if any(named.get(key) != wanted for key, wanted in field.match):
                continue
            reading = value
            if field.rate:
                # Each counter's own rate, summed for a total: a link missing from one sample
                # then costs its share of that sample, not a spike when it is back.
                counter = (gpu, spec.name, tuple(named.items()))
                per_second = None if rates is None else rates.rate(counter, value, now)
                if per_second is None:
                    continue
                reading = per_second
            if field.total:
                totals[field] = totals.get(field, 0.0) + reading
                continue
            theirs = tuple((t, named[ours]) for ours, t in field.labels if named.get(ours))
            converted = _converted(reading, field.scale)
            series.append(_Series(field, theirs, converted, named.get("mig_uuid", "")))
    for field, total in totals.items():
        series.append(_Series(field, (), _converted(total, field.scale), ""))
    out: dict[tuple[str, Labels], _Series] = {}
    for entry in series:
        key = (entry.field.name, entry.labels)
        kept = out.get(key)
        # One series per field and labels: a fallback source only where nothing better is.
        if kept is None or (kept.field.fallback and not entry.field.fallback):
            out[key] = entry
    present = {name for name, _ in out}
    for field in baseline:
        if field.name not in present:
            out[(field.name, ())] = _Series(field, (), 0.0, "")
    pods = _pods(samples)
    result = []
    for entry in out.values():
        labels = entry.labels
        if entry.field.value_labels is not None:
            labels += entry.field.value_labels(entry.value)
        labels += pods.get(entry.mig_uuid, ())
        result.append((entry.field, labels, entry.value))
    return result
