"""CPU-cost profiles for the stand-in: what a real driver's calls cost the calling thread.

On a real GPU many NVML calls are RPCs to the GPU's firmware that keep the calling thread busy
for 0.1-12 ms; the stand-in answers at once unless a Fleet carries a profile, in which case each
call burns the modelled thread CPU time (and sleeps for any further wall time) before answering.

Only costs clearly above the Python/ctypes overhead of the measuring call are modelled (20 us or
more measured): a call measured at 1-10 us was mostly that overhead, which a benchmark pays for
real, so it costs 0 here. The modelled figures keep that overhead (1-5 us): beside costs of
28 us to 12 ms it is noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

# Mirrors COSTED_IDS in nvml_stub.c: a profile can price field and GPM metric ids below it.
COSTED_IDS = 512


@dataclass(frozen=True)
class CallCost:
    cpu_us: float
    wall_us: float | None = None
    """None: the same as cpu_us. More than cpu_us: the driver waits for the GPU that long."""

    @property
    def wall(self) -> float:
        return self.cpu_us if self.wall_us is None else self.wall_us


@dataclass(frozen=True)
class CostProfile:
    """Per C symbol, the cost of one call. nvmlDeviceGetFieldValues and nvmlGpmMetricsGet also
    cost, per entry asked, their field's or metric's CPU time (wall time the same), summed;
    nvmlDeviceGetSamples costs its symbol's figure only when it reads into a buffer."""

    name: str
    symbols: Mapping[str, CallCost] = field(default_factory=dict)
    fields: Mapping[int, float] = field(default_factory=dict)
    """Field id -> CPU us per nvmlDeviceGetFieldValues entry asking for it."""
    gpm_metrics: Mapping[int, float] = field(default_factory=dict)
    """GPM metric id -> CPU us per nvmlGpmMetricsGet entry asking for it."""


def config_lines(profile: CostProfile) -> Iterator[str]:
    """The profile as the stand-in's config lines (see nvml_stub.c); raises ValueError for a
    cost it cannot model. Symbol names are checked by the Fleet, which knows the exports."""
    for symbol, cost in sorted(profile.symbols.items()):
        if cost.cpu_us < 0 or cost.wall < cost.cpu_us:
            raise ValueError(f"{symbol}: need 0 <= cpu_us <= wall_us, got {cost}")
        yield f"cost {symbol} {float(cost.cpu_us)!r} {float(cost.wall)!r}"
    for kind, table in (("fieldcost", profile.fields), ("gpmcost", profile.gpm_metrics)):
        for ident, cpu_us in sorted(table.items()):
            if not 0 <= ident < COSTED_IDS:
                raise ValueError(f"{kind}: id {ident} outside 0..{COSTED_IDS - 1}")
            if cpu_us < 0:
                raise ValueError(f"{kind} {ident}: negative cost {cpu_us}")
            yield f"{kind} {ident} {float(cpu_us)!r}"


H200_DRIVER_580 = CostProfile(
    name="h200-driver-580",
    symbols={
        # driver.<method>_us in benchmarks/data/h200-costs.json, unless said otherwise.
        "nvmlDeviceGetBAR1MemoryInfo": CallCost(152.1),
        "nvmlDeviceGetEccMode": CallCost(145.7),
        "nvmlDeviceGetMigMode": CallCost(138.7),
        # driver.mig_instances: with MIG off the driver answers 0 here, so that method made this
        # one call (a direct ctypes probe on the same GPU: 163 us; each
        # nvmlDeviceGetMigDeviceHandleByIndex ~5 us).
        "nvmlDeviceGetMaxMigDeviceCount": CallCost(141.0),
        "nvmlDeviceGetCurrPcieLinkWidth": CallCost(27.7),
        "nvmlDeviceGetTotalEnergyConsumption": CallCost(3587.2),
        # h200-probe.json (pynvml): our driver does not call it, nvitop's Device.power_limit() does.
        "nvmlDeviceGetPowerManagementLimit": CallCost(168.62),
        # h200-probe.json: the driver waits ~20 ms for the GPU's PCIe counters, mostly asleep.
        "nvmlDeviceGetPcieThroughput": CallCost(832.22, wall_us=20898.79),
        # The nine *_UTILIZATION_SAMPLES figures (2181-2722 us) averaged; reads only.
        "nvmlDeviceGetSamples": CallCost(2449.4),
        # gpm_sample_get_us. nvmlGpmMigSampleGet is likely similar but was not measured (MIG off).
        "nvmlGpmSampleGet": CallCost(37.9),
    },
    # fields_alone_us, those at 20 us or more. Asked together they cost ~4% less than summed.
    fields={
        2: 143.0,  # ECC_PENDING
        75: 553.6,  # PERF_POLICY_THERMAL
        83: 4142.3,  # TOTAL_ENERGY_CONSUMPTION
        94: 183.4,  # PCIE_REPLAY_COUNTER
        95: 160.0,  # PCIE_REPLAY_ROLLOVER_COUNTER
        169: 164.1,  # PCIE_L0_TO_RECOVERY_COUNTER
        173: 153.5,  # PCIE_COUNT_CORRECTABLE_ERRORS
        174: 170.0,  # PCIE_COUNT_NAKS_RECEIVED
        175: 167.9,  # PCIE_COUNT_RECEIVER_ERROR
        176: 153.8,  # PCIE_COUNT_BAD_TLP
        177: 212.7,  # PCIE_COUNT_NAKS_SENT
        178: 155.8,  # PCIE_COUNT_BAD_DLLP
        179: 170.1,  # PCIE_COUNT_NON_FATAL_ERROR
        180: 166.7,  # PCIE_COUNT_FATAL_ERROR
        181: 151.4,  # PCIE_COUNT_UNSUPPORTED_REQ
        182: 156.5,  # PCIE_COUNT_LCRC_ERROR
        183: 151.3,  # PCIE_COUNT_LANE_ERROR
        184: 164.6,  # IS_RESETLESS_MIG_SUPPORTED
        191: 4065.2,  # ENERGY
        193: 150.5,  # TEMPERATURE_SHUTDOWN_TLIMIT
        197: 155.5,  # PCIE_COUNT_TX_BYTES
        198: 152.6,  # PCIE_COUNT_RX_BYTES
        199: 166.0,  # IS_MIG_MODE_INDEPENDENT_MIG_QUERY_CAPABLE
        226: 141.8,  # RESET_STATUS
        227: 140.3,  # DRAIN_AND_RESET_STATUS
        270: 572.6,  # CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN
        271: 568.1,  # CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN
        272: 12100.1,  # POWER_SYNC_BALANCING_FREQ
    },
    # gpm_alone_us: GRAPHICS_UTIL alone costs what all metrics together do (gpm_all_us 1335.9);
    # every other metric 3-6 us.
    gpm_metrics={1: 1398.1},
)
"""One NVIDIA H200 in a Firecracker VM, driver 580.159.04, nvidia-ml-py 13.615.71: thread CPU
time (time.thread_time) per call, from benchmarks/data/h200-costs.json (benchmarks.realgpu's
costs(): 20 repetitions per call, made through the exporter's PynvmlDriver) and, for calls that
did not time, h200-probe.json (its probe(): pynvml, 200 repetitions; 3 for
nvmlDeviceGetPcieThroughput, the one call whose wall time is far above its CPU time)."""
