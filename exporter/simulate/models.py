"""The catalogue of simulated GPU models: what each board is, not how it behaves.

Imports nothing from the rest of the exporter, so that the configuration can validate model names
against it.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
HOPPER = 9
BAR1_BYTES = 256 * 1024 * MIB
MIG_SLOTS = 7
# GPU instance ids NVML assigns to the seven 1g instances of a fully partitioned GPU.
MIG_GPU_INSTANCE_IDS = (7, 8, 9, 11, 12, 13, 14)


@dataclass(frozen=True)
class GpuModel:
    name: str
    architecture: int
    memory_bytes: int
    tdp_watts: float
    idle_watts: float
    max_sm_mhz: int
    idle_sm_mhz: int
    memory_mhz: int
    video_mhz: int
    fans: int
    # Degrees above ambient per watt at steady state.
    thermal_resistance: float
    nvlinks: int
    pcie_generation: int
    has_encoder: bool
    # shutdown, slowdown, memory max, gpu max (nvmlTemperatureThresholds_t order)
    thresholds: tuple[int, int, int, int]
    # HBM boards remap rows; GDDR boards retire pages instead.
    row_remapping: bool = True
    # Recent data-center boards count PCIe bytes; others only offer the 20 ms throughput call.
    pcie_byte_counters: bool = True
    # The smallest MIG profile, seven of which fill the GPU; "" where MIG is not supported.
    mig_profile: str = ""


MODELS = {
    m.name: m
    for m in (
        GpuModel(
            name="NVIDIA H200",
            architecture=9,
            memory_bytes=143771 * MIB,
            tdp_watts=700,
            idle_watts=75,
            max_sm_mhz=1980,
            idle_sm_mhz=345,
            memory_mhz=3201,
            video_mhz=1965,
            fans=0,
            thermal_resistance=0.062,
            nvlinks=18,
            pcie_generation=5,
            has_encoder=False,
            thresholds=(92, 89, 95, 87),
            mig_profile="1g.18gb",
        ),
        GpuModel(
            name="NVIDIA H100 80GB HBM3",
            architecture=9,
            memory_bytes=81559 * MIB,
            tdp_watts=700,
            idle_watts=70,
            max_sm_mhz=1980,
            idle_sm_mhz=345,
            memory_mhz=2619,
            video_mhz=1755,
            fans=0,
            thermal_resistance=0.065,
            nvlinks=18,
            pcie_generation=5,
            has_encoder=False,
            thresholds=(92, 89, 95, 87),
            mig_profile="1g.10gb",
        ),
        GpuModel(
            name="NVIDIA A100-SXM4-80GB",
            architecture=7,
            memory_bytes=81920 * MIB,
            tdp_watts=400,
            idle_watts=55,
            max_sm_mhz=1410,
            idle_sm_mhz=210,
            memory_mhz=1593,
            video_mhz=1275,
            fans=0,
            thermal_resistance=0.11,
            nvlinks=12,
            pcie_generation=4,
            has_encoder=False,
            thresholds=(92, 89, 95, 85),
            mig_profile="1g.10gb",
        ),
        GpuModel(
            name="NVIDIA L40S",
            architecture=8,
            memory_bytes=46068 * MIB,
            tdp_watts=350,
            idle_watts=35,
            max_sm_mhz=2520,
            idle_sm_mhz=210,
            memory_mhz=9001,
            video_mhz=1965,
            fans=1,
            thermal_resistance=0.14,
            nvlinks=0,
            pcie_generation=4,
            has_encoder=True,
            thresholds=(98, 95, 0, 88),
            row_remapping=False,
            pcie_byte_counters=False,
        ),
    )
}
