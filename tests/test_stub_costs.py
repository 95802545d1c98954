"""The stand-in's opt-in CPU-cost model, measured from inside a pynvml subprocess.

Each modelled cost is a spin on the calling thread's CPU clock, so a call's thread CPU time is
at least its modelled cost however loaded the machine is; the tests assert that with a margin and
never an upper bound near the model, except that a free call stays far below 1 ms.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nvml_stub
import pytest
from nvml_stub.costs import COSTED_IDS, H200_DRIVER_580, CallCost, CostProfile

# Measured lower bounds are this share of the model: the spin itself cannot undershoot, this
# only absorbs the clock's granularity.
_MARGIN = 0.75
# A call the model leaves free costs the stand-in a few microseconds; this is far above that.
_FREE_US = 1000.0

_PROFILE = CostProfile(
    name="test",
    symbols={
        "nvmlDeviceGetPowerUsage": CallCost(2000.0),
        "nvmlDeviceGetPcieThroughput": CallCost(2000.0, wall_us=30000.0),
        "nvmlDeviceGetSamples": CallCost(2000.0),
        "nvmlDeviceGetFieldValues": CallCost(500.0),
    },
    fields={
        nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION: 3000.0,
        nvml_stub.FI_PCIE_COUNT_TX_BYTES: 1000.0,
    },
    gpm_metrics={nvml_stub.GPM_GRAPHICS_UTIL: 2000.0},
)

# Reads one line of probe names per measurement from stdin and answers each probe's thread CPU
# and wall microseconds, one call each.
_PROBER = """
import ctypes, json, sys, time
import pynvml as n

n.nvmlInit()
h = n.nvmlDeviceGetHandleByIndex(0)
samples_fn = n._nvmlGetFunctionPointer("nvmlDeviceGetSamples")
sample_buffer = (n.c_nvmlSample_t * 100)()
gpm_samples = (n.nvmlGpmSampleAlloc(), n.nvmlGpmSampleAlloc())
for s in gpm_samples:
    n.nvmlGpmSampleGet(h, s)

def samples(buffer, since=0):
    value_type, count = ctypes.c_uint(), ctypes.c_uint(100)
    samples_fn(h, ctypes.c_uint(n.NVML_GPU_UTILIZATION_SAMPLES), ctypes.c_ulonglong(since),
               ctypes.byref(value_type), ctypes.byref(count), buffer)

def gpm(ids):
    request = n.c_nvmlGpmMetricsGet_t()
    request.version = n.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(ids)
    request.sample1, request.sample2 = gpm_samples
    for i, metric in enumerate(ids):
        request.metrics[i].metricId = metric
    n.nvmlGpmMetricsGet(request)

def call(probe):
    kind, *args = probe.split()
    ids = [int(a) for a in args]
    if kind == "power":
        n.nvmlDeviceGetPowerUsage(h)
    elif kind == "temperature":
        n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)
    elif kind == "energy":
        n.nvmlDeviceGetTotalEnergyConsumption(h)
    elif kind == "pcie":
        n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES)
    elif kind == "samples":
        samples(sample_buffer)
    elif kind == "samples-nothing-newer":
        samples(sample_buffer, since=1 << 62)
    elif kind == "samples-size":
        samples(None)
    elif kind == "fields":
        n.nvmlDeviceGetFieldValues(h, ids)
    elif kind == "gpm":
        gpm(ids)
    else:
        raise ValueError(probe)

for line in sys.stdin:
    answer = {}
    for probe in json.loads(line):
        n.nvmlDeviceGetCount()  # loads a replaced config outside the measurement
        wall, cpu = time.perf_counter(), time.thread_time()
        call(probe)
        answer[probe] = [(time.thread_time() - cpu) * 1e6, (time.perf_counter() - wall) * 1e6]
    print(json.dumps(answer), flush=True)
"""


@dataclass(frozen=True)
class Timing:
    cpu_us: float
    wall_us: float


class Prober:
    """A pynvml subprocess on the fleet's stand-in that times the calls it is asked for."""

    def __init__(self, fleet: nvml_stub.Fleet) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_PROBER)],
            env=fleet.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def measure(self, *probes: str) -> dict[str, Timing]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(probes) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready, "the prober did not answer in time"
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "the prober exited"
        return {probe: Timing(*times) for probe, times in json.loads(line).items()}

    def close(self) -> None:
        _, err = self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err


@pytest.fixture
def fleet(tmp_path: Path) -> nvml_stub.Fleet:
    return nvml_stub.Fleet(tmp_path, num_devices=1, costs=_PROFILE)


@pytest.fixture
def prober(fleet: nvml_stub.Fleet) -> Iterator[Prober]:
    started = Prober(fleet)
    yield started
    started.close()


def test_a_symbol_burns_its_cpu_time_in_the_calling_thread(prober: Prober) -> None:
    got = prober.measure("power", "temperature")
    assert got["power"].cpu_us >= _MARGIN * 2000
    assert got["temperature"].cpu_us < _FREE_US  # not in the profile


def test_wall_time_beyond_the_cpu_time_is_slept(prober: Prober) -> None:
    pcie = prober.measure("pcie")["pcie"]
    assert pcie.cpu_us >= _MARGIN * 2000
    # The rest is slept to a deadline 30 ms after the call began, not spun.
    assert pcie.wall_us >= 29_000
    assert pcie.cpu_us < 15_000


def test_field_values_cost_their_base_plus_each_entry_asked(prober: Prober) -> None:
    energy, tx = nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION, nvml_stub.FI_PCIE_COUNT_TX_BYTES
    free = nvml_stub.FI_MEMORY_TEMP
    got = prober.measure(
        f"fields {energy}", f"fields {energy} {tx}", f"fields {energy} {energy}", f"fields {free}"
    )
    assert got[f"fields {energy}"].cpu_us >= _MARGIN * (500 + 3000)
    assert got[f"fields {energy} {tx}"].cpu_us >= _MARGIN * (500 + 3000 + 1000)
    assert got[f"fields {energy} {energy}"].cpu_us >= _MARGIN * (500 + 2 * 3000)
    # A field without a price costs only the call's base.
    assert got[f"fields {free}"].cpu_us >= _MARGIN * 500
    assert got[f"fields {free}"].cpu_us < 500 + _FREE_US


def test_gpm_metrics_cost_per_metric_asked(prober: Prober) -> None:
    graphics, sm = nvml_stub.GPM_GRAPHICS_UTIL, nvml_stub.GPM_SM_UTIL
    got = prober.measure(f"gpm {graphics}", f"gpm {graphics} {sm}", f"gpm {sm}")
    assert got[f"gpm {graphics}"].cpu_us >= _MARGIN * 2000
    assert got[f"gpm {graphics} {sm}"].cpu_us >= _MARGIN * 2000
    assert got[f"gpm {sm}"].cpu_us < _FREE_US


def test_samples_charge_reads_but_not_size_queries(prober: Prober) -> None:
    got = prober.measure("samples", "samples-nothing-newer", "samples-size")
    assert got["samples"].cpu_us >= _MARGIN * 2000
    assert got["samples-nothing-newer"].cpu_us >= _MARGIN * 2000
    assert got["samples-size"].cpu_us < _FREE_US


_ALL_PROBES = (
    "power",
    "pcie",
    "samples",
    f"fields {nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION}",
    f"gpm {nvml_stub.GPM_GRAPHICS_UTIL}",
)


def test_without_a_cost_table_calls_cost_nothing_extra(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=1)
    assert fleet.costs is None
    assert not re.search(r"^(cost|fieldcost|gpmcost) ", fleet.config_path.read_text(), re.M)
    prober = Prober(fleet)
    try:
        for probe, timing in prober.measure(*_ALL_PROBES).items():
            assert timing.cpu_us < _FREE_US, probe
    finally:
        prober.close()


def test_costs_switch_on_and_off_in_a_running_process(
    fleet: nvml_stub.Fleet, prober: Prober
) -> None:
    fleet.set_costs(None)
    assert fleet.costs is None
    for probe, timing in prober.measure(*_ALL_PROBES).items():
        assert timing.cpu_us < _FREE_US, probe
    fleet.set_costs(_PROFILE)
    assert prober.measure("power")["power"].cpu_us >= _MARGIN * 2000


def test_the_profile_is_written_as_cost_lines(fleet: nvml_stub.Fleet) -> None:
    lines = fleet.config_path.read_text().splitlines()
    assert "cost nvmlDeviceGetPcieThroughput 2000.0 30000.0" in lines
    assert "cost nvmlDeviceGetPowerUsage 2000.0 2000.0" in lines  # wall defaults to CPU
    assert f"fieldcost {nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION} 3000.0" in lines
    assert f"gpmcost {nvml_stub.GPM_GRAPHICS_UTIL} 2000.0" in lines


def test_h200_profile_charges_what_the_driver_was_measured_at(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=1, costs=H200_DRIVER_580)
    prober = Prober(fleet)
    try:
        energy = nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION
        got = prober.measure("energy", "pcie", f"fields {energy}", "temperature")
    finally:
        prober.close()
    symbols, fields = H200_DRIVER_580.symbols, H200_DRIVER_580.fields
    energy_cost = symbols["nvmlDeviceGetTotalEnergyConsumption"].cpu_us
    assert got["energy"].cpu_us >= _MARGIN * energy_cost
    assert got["pcie"].cpu_us >= _MARGIN * symbols["nvmlDeviceGetPcieThroughput"].cpu_us
    assert got["pcie"].wall_us >= _MARGIN * symbols["nvmlDeviceGetPcieThroughput"].wall
    assert got[f"fields {energy}"].cpu_us >= _MARGIN * fields[energy]
    assert got["temperature"].cpu_us < _FREE_US


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (CostProfile("x", symbols={"nvmlNoSuchCall": CallCost(1.0)}), "unknown NVML symbols"),
        (CostProfile("x", symbols={"*": CallCost(1.0)}), "unknown NVML symbols"),
        (CostProfile("x", symbols={"nvmlShutdown": CallCost(-1.0)}), "cpu_us <= wall_us"),
        (CostProfile("x", symbols={"nvmlShutdown": CallCost(5.0, 1.0)}), "cpu_us <= wall_us"),
        (CostProfile("x", fields={COSTED_IDS: 1.0}), "outside"),
        (CostProfile("x", gpm_metrics={-1: 1.0}), "outside"),
        (CostProfile("x", fields={83: -1.0}), "negative"),
    ],
)
def test_profiles_the_library_cannot_model_are_refused(
    tmp_path: Path, profile: CostProfile, message: str
) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=1)
    with pytest.raises(ValueError, match=message):
        fleet.set_costs(profile)
    with pytest.raises(ValueError, match=message):
        nvml_stub.Fleet(tmp_path / "other", num_devices=1, costs=profile)


def test_costed_ids_match_the_library() -> None:
    source = (nvml_stub.PACKAGE_DIR / "nvml_stub.c").read_text()
    match = re.search(r"^#define COSTED_IDS (\d+)$", source, re.M)
    assert match is not None
    assert int(match[1]) == COSTED_IDS
    profile = H200_DRIVER_580
    assert all(0 <= i < COSTED_IDS for i in (*profile.fields, *profile.gpm_metrics))
