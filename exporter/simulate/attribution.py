"""Who runs the simulated fleet's processes, for the cli to pair with `SimulatedDriver`."""

from __future__ import annotations

import random

from exporter.nvml import NvmlError
from exporter.simulate.driver import SimulatedDriver
from exporter.workload import Container


class SimulatedAttribution:
    """Names and containers for the simulated fleet's processes, as if every inference server
    ran in its own Kubernetes pod."""

    def __init__(self, driver: SimulatedDriver, seed: int) -> None:
        self._driver = driver
        self._seed = seed

    def process_name(self, pid: int) -> str | None:
        try:
            return self._driver.process_name(pid)
        except NvmlError:
            return None

    def container(self, pid: int) -> Container | None:
        rng = random.Random(f"container-{self._seed}-{pid}")
        container_id = f"{rng.getrandbits(256):064x}"
        h = f"{rng.getrandbits(128):032x}"
        pod_uid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        return Container(container_id=container_id, pod_uid=pod_uid)
