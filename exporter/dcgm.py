"""`naming: dcgm`: dcgm-exporter's names, units and labels, for drop-in migration.

Each metric spec names the dcgm-exporter fields it stands for (`MetricSpec.dcgm`); this module
turns one device's samples into those fields, so existing dashboards and alerts keep working.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator

from exporter.collectors.base import Dcgm, Sample
from exporter.collectors.info import device_node
from exporter.nvml import Device

# dcgm-exporter's label set on every GPU series, in its order.
IDENTITY_LABELS = (
    "gpu",
    "UUID",
    "pci_bus_id",
    "device",
    "modelName",
    "Hostname",
    "DCGM_FI_DRIVER_VERSION",
)


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


def translate(
    samples: Iterable[Sample],
) -> Iterator[tuple[Dcgm, tuple[tuple[str, str], ...], float]]:
    """(field, labels beyond the identity, value in dcgm-exporter's unit) for each sample."""
    totals: dict[Dcgm, float] = {}
    for spec, labels, value in samples:
        if not spec.dcgm:
            continue
        named = dict(zip(spec.labels, labels, strict=True))
        for field in spec.dcgm:
            if any(named.get(key) != wanted for key, wanted in field.match):
                continue
            scaled = value * field.scale
            if field.total:
                totals[field] = totals.get(field, 0.0) + scaled
                continue
            kept = tuple((theirs, named[ours]) for ours, theirs in field.labels if named.get(ours))
            yield field, kept, scaled
    for field, total in totals.items():
        yield field, (), total
