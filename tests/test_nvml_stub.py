"""Drives the libnvidia-ml.so.1 stand-in through the real pynvml, one subprocess per scenario.

pynvml caches the loaded library per process, so every scenario gets a fresh interpreter whose
environment points at the stand-in.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import nvml_stub
import pynvml
import pytest

from exporter.nvml.pynvml_driver import MIN_SAMPLE_CAPACITY

_PRELUDE = """
import json, sys, threading, time
import pynvml as n

def emit(obj):
    print(json.dumps(obj), flush=True)

def step(obj):
    emit(obj)
    sys.stdin.readline()

def error_of(fn, *args):
    try:
        fn(*args)
    except n.NVMLError as e:
        return e.value
    return 0
"""


def run_py(fleet: nvml_stub.Fleet, body: str) -> Any:
    """Runs `body` under pynvml with the fleet's environment; returns its last JSON line."""
    script = _PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=fleet.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


class Interactive:
    """A pynvml subprocess that pauses at each step() until the test lets it continue."""

    def __init__(self, fleet: nvml_stub.Fleet, body: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PRELUDE + textwrap.dedent(body)],
            env=fleet.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def expect(self, timeout: float = 10.0) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "subprocess produced no output in time"
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "subprocess exited"
        return json.loads(line)

    def proceed(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        _, err = self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err


@pytest.fixture
def fleet(tmp_path: Path) -> nvml_stub.Fleet:
    return nvml_stub.Fleet(tmp_path)


def test_constants_match_pynvml() -> None:
    pairs = {
        "NVML_ERROR_NOT_SUPPORTED": nvml_stub.NVML_ERROR_NOT_SUPPORTED,
        "NVML_ERROR_DRIVER_NOT_LOADED": nvml_stub.NVML_ERROR_DRIVER_NOT_LOADED,
        "NVML_ERROR_GPU_IS_LOST": nvml_stub.NVML_ERROR_GPU_IS_LOST,
        "NVML_DEVICE_ARCH_AMPERE": nvml_stub.ARCH_AMPERE,
        "NVML_DEVICE_ARCH_ADA": nvml_stub.ARCH_ADA,
        "NVML_DEVICE_ARCH_HOPPER": nvml_stub.ARCH_HOPPER,
        "NVML_BRAND_NVIDIA": nvml_stub.BRAND_NVIDIA,
        "NVML_CLOCK_VIDEO": nvml_stub.CLOCK_VIDEO,
        "NVML_CLOCK_ID_CUSTOMER_BOOST_MAX": nvml_stub.CLOCK_ID_BOOST_MAX,
        "NVML_GPU_UTILIZATION_SAMPLES": nvml_stub.GPU_UTILIZATION_SAMPLES,
        "NVML_MEMORY_UTILIZATION_SAMPLES": nvml_stub.MEMORY_UTILIZATION_SAMPLES,
        "NVML_ENC_UTILIZATION_SAMPLES": nvml_stub.ENC_UTILIZATION_SAMPLES,
        "NVML_DEC_UTILIZATION_SAMPLES": nvml_stub.DEC_UTILIZATION_SAMPLES,
        "NVML_PCIE_UTIL_TX_BYTES": nvml_stub.PCIE_UTIL_TX_BYTES,
        "NVML_PCIE_UTIL_RX_BYTES": nvml_stub.PCIE_UTIL_RX_BYTES,
        "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS": (
            nvml_stub.PAGE_RETIREMENT_CAUSE_SBE
        ),
        "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR": nvml_stub.PAGE_RETIREMENT_CAUSE_DBE,
        "nvmlEventTypeXidCriticalError": nvml_stub.EVENT_XID_CRITICAL,
        "nvmlEventTypeClock": nvml_stub.EVENT_CLOCK,
        "NVML_VALUE_TYPE_DOUBLE": nvml_stub.VALUE_TYPE_DOUBLE,
        "NVML_VALUE_TYPE_UNSIGNED_INT": nvml_stub.VALUE_TYPE_UNSIGNED_INT,
        "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    }
    for name in dir(nvml_stub):
        if name.startswith("FI_"):
            pairs[f"NVML_FI_DEV_{name[3:]}"] = getattr(nvml_stub, name)
        elif name.startswith("GPM_") and name.isupper():
            pairs[f"NVML_GPM_METRIC_{name[4:]}"] = getattr(nvml_stub, name)
    mismatched = {k: v for k, v in pairs.items() if getattr(pynvml, k) != v}
    assert mismatched == {}


def test_library_exports_exactly_the_symbols_and_resolves_everything(
    fleet: nvml_stub.Fleet,
) -> None:
    library = fleet.library_dir / nvml_stub.SONAME
    defined = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    exported = {line.split()[-1] for line in defined.splitlines() if " T " in line}
    assert exported == set(nvml_stub.SYMBOLS)
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    # Strong undefined references must all be versioned libc symbols.
    strong = [line.split()[-1] for line in undefined.splitlines() if line.split()[0] == "U"]
    assert strong and all("@GLIBC_" in name for name in strong), strong
    loaded = run_py(
        fleet,
        """
        import ctypes, os
        lib = ctypes.CDLL(os.environ["LD_LIBRARY_PATH"].split(":")[0] + "/libnvidia-ml.so.1",
                          mode=os.RTLD_NOW)
        emit(lib._name)
        """,
    )
    assert loaded.endswith(nvml_stub.SONAME)


def test_build_is_cached_and_safe_to_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVML_STUB_BUILD_DIR", str(tmp_path / "cache"))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(nvml_stub.build())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    built = results[0] / nvml_stub.SONAME
    mtime = built.stat().st_mtime_ns
    assert nvml_stub.build() == results[0]
    assert built.stat().st_mtime_ns == mtime
    assert [p.name for p in results[0].iterdir()] == [nvml_stub.SONAME]
    assert nvml_stub.build(omit=["nvmlDeviceGetSamples"]) != results[0]
    with pytest.raises(ValueError, match="nvmlNoSuchThing"):
        nvml_stub.build(omit=["nvmlNoSuchThing"])


def test_static_and_dynamic_values_match_the_model(fleet: nvml_stub.Fleet) -> None:
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        out = {"driver": n.nvmlSystemGetDriverVersion(), "nvml": n.nvmlSystemGetNVMLVersion(),
               "cuda": [n.nvmlSystemGetCudaDriverVersion(), n.nvmlSystemGetCudaDriverVersion_v2()],
               "devices": []}
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            pci = n.nvmlDeviceGetPciInfo(h)
            m1 = n.nvmlDeviceGetMemoryInfo(h)
            m2 = n.nvmlDeviceGetMemoryInfo(h, version=n.nvmlMemory_v2)
            bar1 = n.nvmlDeviceGetBAR1MemoryInfo(h)
            util = n.nvmlDeviceGetUtilizationRates(h)
            uuid = n.nvmlDeviceGetUUID(h)
            out["devices"].append({
                "name": n.nvmlDeviceGetName(h), "uuid": uuid,
                "by_uuid": n.nvmlDeviceGetMinorNumber(n.nvmlDeviceGetHandleByUUID(uuid)),
                "serial": n.nvmlDeviceGetSerial(h), "vbios": n.nvmlDeviceGetVbiosVersion(h),
                "brand": n.nvmlDeviceGetBrand(h), "arch": n.nvmlDeviceGetArchitecture(h),
                "minor": n.nvmlDeviceGetMinorNumber(h),
                "cc": list(n.nvmlDeviceGetCudaComputeCapability(h)),
                "persistence": n.nvmlDeviceGetPersistenceMode(h),
                "compute_mode": n.nvmlDeviceGetComputeMode(h),
                "pci": [pci.busId, pci.busIdLegacy, pci.domain, pci.bus,
                        pci.device, pci.pciDeviceId, pci.pciSubSystemId],
                "util": [util.gpu, util.memory],
                "mem_v1": [m1.total, m1.free, m1.used],
                "mem_v2": [m2.version, m2.total, m2.reserved, m2.free, m2.used],
                "bar1": [bar1.bar1Total, bar1.bar1Free, bar1.bar1Used],
                "temp": [n.nvmlDeviceGetTemperature(h, 0), n.nvmlDeviceGetTemperatureV(h, 0)],
                "thresholds": [n.nvmlDeviceGetTemperatureThreshold(h, t) for t in range(4)],
                "power": [n.nvmlDeviceGetPowerUsage(h), n.nvmlDeviceGetEnforcedPowerLimit(h),
                          n.nvmlDeviceGetPowerManagementLimit(h),
                          n.nvmlDeviceGetPowerManagementDefaultLimit(h),
                          n.nvmlDeviceGetPowerManagementLimitConstraints(h)],
                "energy": n.nvmlDeviceGetTotalEnergyConsumption(h),
                "clock_info": [n.nvmlDeviceGetClockInfo(h, t) for t in range(4)],
                "max_clock": [n.nvmlDeviceGetMaxClockInfo(h, t) for t in range(4)],
                "clock": [[n.nvmlDeviceGetClock(h, t, c) for c in range(4)] for t in range(4)],
                "fans": [error_of(n.nvmlDeviceGetNumFans, h), error_of(n.nvmlDeviceGetFanSpeed, h)],
                "pstate": n.nvmlDeviceGetPerformanceState(h),
                "reasons": n.nvmlDeviceGetCurrentClocksEventReasons(h),
                "enc": n.nvmlDeviceGetEncoderUtilization(h),
                "dec": n.nvmlDeviceGetDecoderUtilization(h),
                "enc_stats": n.nvmlDeviceGetEncoderStats(h),
                "ecc_mode": n.nvmlDeviceGetEccMode(h),
                "ecc": [[n.nvmlDeviceGetTotalEccErrors(h, e, c) for c in range(2)]
                        for e in range(2)],
                "retired": error_of(n.nvmlDeviceGetRetiredPages_v2, h, 0),
                "remapped": list(n.nvmlDeviceGetRemappedRows(h)),
                "pcie": [n.nvmlDeviceGetCurrPcieLinkGeneration(h),
                         n.nvmlDeviceGetMaxPcieLinkGeneration(h),
                         n.nvmlDeviceGetCurrPcieLinkWidth(h), n.nvmlDeviceGetMaxPcieLinkWidth(h),
                         n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES),
                         n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES),
                         n.nvmlDeviceGetPcieReplayCounter(h)],
                "nvlink": [n.nvmlDeviceGetNvLinkState(h, link) for link in range(18)],
                "nvlink_past_end": error_of(n.nvmlDeviceGetNvLinkState, h, 18),
                "mig": n.nvmlDeviceGetMigMode(h), "max_mig": n.nvmlDeviceGetMaxMigDeviceCount(h),
                "is_mig": n.nvmlDeviceIsMigDeviceHandle(h).value,
                "events": n.nvmlDeviceGetSupportedEventTypes(h),
            })
        n.nvmlShutdown()
        emit(out)
        """,
    )
    assert got["driver"] == fleet.driver_version
    assert got["nvml"] == fleet.nvml_version
    assert got["cuda"] == [fleet.cuda_driver_version] * 2
    assert len(got["devices"]) == len(fleet.devices) == 8
    not_supported = nvml_stub.NVML_ERROR_NOT_SUPPORTED
    for d, g in zip(fleet.devices, got["devices"], strict=True):
        assert g == {
            "name": "NVIDIA H200",
            "uuid": d.uuid,
            "by_uuid": d.index,
            "serial": d.serial,
            "vbios": d.vbios_version,
            "brand": d.brand,
            "arch": nvml_stub.ARCH_HOPPER,
            "minor": d.minor_number,
            "cc": [9, 0],
            "persistence": d.persistence_mode,
            "compute_mode": d.compute_mode,
            "pci": [
                d.pci_bus_id,
                d.pci_bus_id_legacy,
                d.pci_domain,
                d.pci_bus,
                d.pci_device,
                d.pci_device_id,
                d.pci_subsystem_id,
            ],
            "util": [d.utilization_gpu, d.utilization_memory],
            "mem_v1": [d.memory_total, d.memory_free, d.memory_total - d.memory_free],
            "mem_v2": [
                pynvml.nvmlMemory_v2,
                d.memory_total,
                d.memory_reserved,
                d.memory_free,
                d.memory_used,
            ],
            "bar1": [d.bar1_total, d.bar1_free, d.bar1_used],
            "temp": [d.temperature_gpu] * 2,
            "thresholds": [d.temperature_thresholds[t] for t in range(4)],
            "power": [
                d.power_usage,
                d.power_limit_enforced,
                d.power_limit,
                d.power_limit_default,
                [d.power_limit_min, d.power_limit_max],
            ],
            "energy": d.energy,
            "clock_info": [d.clocks[(t, nvml_stub.CLOCK_ID_CURRENT)] for t in range(4)],
            "max_clock": [d.max_clocks[t] for t in range(4)],
            "clock": [[d.clocks[(t, c)] for c in range(4)] for t in range(4)],
            "fans": [not_supported, not_supported],
            "pstate": d.performance_state,
            "reasons": d.clocks_event_reasons,
            "enc": [d.encoder_utilization, d.encoder_sampling_period],
            "dec": [d.decoder_utilization, d.decoder_sampling_period],
            "enc_stats": [0, 0, 0],
            "ecc_mode": [d.ecc_mode_current, d.ecc_mode_pending],
            "ecc": [[d.ecc_errors[(e, c)] for c in range(2)] for e in range(2)],
            "retired": not_supported,  # Hopper remaps rows instead
            "remapped": list(d.remapped_rows),
            "pcie": [
                d.pcie_link_gen_current,
                d.pcie_link_gen_max,
                d.pcie_link_width_current,
                d.pcie_link_width_max,
                d.pcie_tx_throughput,
                d.pcie_rx_throughput,
                d.pcie_replay_counter,
            ],
            "nvlink": [1] * 18,
            "nvlink_past_end": pynvml.NVML_ERROR_INVALID_ARGUMENT,
            "mig": [0, 0],
            "max_mig": 0,  # MIG is off: none, as a real H200 answers
            "is_mig": 0,
            "events": d.supported_event_types,
        }
    assert len({g["uuid"] for g in got["devices"]}) == 8
    assert len({g["power"][0] for g in got["devices"]}) == 8


def test_configured_fans_retired_pages_and_version_mismatch(fleet: nvml_stub.Fleet) -> None:
    fleet.devices[0].fan_speeds = [30, 45]
    fleet.devices[0].retired_pages_supported = True
    fleet.devices[0].retired_pages = [
        nvml_stub.RetiredPage(cause=0, address=0x1000, timestamp=11),
        nvml_stub.RetiredPage(cause=0, address=0x2000, timestamp=12),
        nvml_stub.RetiredPage(cause=1, address=0x3000, timestamp=13),
    ]
    fleet.apply()
    got = run_py(
        fleet,
        """
        import ctypes
        def bad_temperature_version(h):
            # pynvml rejects unknown versions itself, so call the symbol directly.
            temp = n.c_nvmlTemperature_v1_t(version=n.nvmlTemperature_v1 + (1 << 24))
            fn = n._nvmlGetFunctionPointer("nvmlDeviceGetTemperatureV")
            return fn(h, ctypes.byref(temp))
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(0)
        emit({"fans": [n.nvmlDeviceGetNumFans(h), n.nvmlDeviceGetFanSpeed(h),
                       n.nvmlDeviceGetFanSpeed_v2(h, 1),
                       error_of(n.nvmlDeviceGetFanSpeed_v2, h, 2)],
              "sbe": n.nvmlDeviceGetRetiredPages_v2(h, 0),
              "dbe": n.nvmlDeviceGetRetiredPages_v2(h, 1),
              "mem_v1_struct_as_v2": error_of(n.nvmlDeviceGetMemoryInfo, h, 1),
              "temp_bad_version": bad_temperature_version(h)})
        """,
    )
    assert got == {
        "fans": [2, 30, 45, pynvml.NVML_ERROR_INVALID_ARGUMENT],
        "sbe": [{"address": 0x1000, "timestamp": 11}, {"address": 0x2000, "timestamp": 12}],
        "dbe": [{"address": 0x3000, "timestamp": 13}],
        "mem_v1_struct_as_v2": pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
        "temp_bad_version": pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    }


def test_running_processes_use_the_two_call_protocol(fleet: nvml_stub.Fleet) -> None:
    dev = fleet.devices[2]
    dev.processes.append(nvml_stub.Process(pid=777, used_gpu_memory=64 << 20, kind="graphics"))
    fleet.devices[5].processes = []
    fleet.apply()
    got = run_py(
        fleet,
        """
        import ctypes
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(2)
        fields = ("pid", "usedGpuMemory", "gpuInstanceId", "computeInstanceId")
        procs = lambda ps: [[getattr(p, f) for f in fields] for p in ps]
        fn = n._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses_v3")
        count = ctypes.c_uint(1)
        buf = (n.c_nvmlProcessInfo_v3_t * 1)()
        short_rc = fn(h, ctypes.byref(count), buf)
        emit({"compute": procs(n.nvmlDeviceGetComputeRunningProcesses(h)),
              "graphics": procs(n.nvmlDeviceGetGraphicsRunningProcesses(h)),
              "none": n.nvmlDeviceGetComputeRunningProcesses(n.nvmlDeviceGetHandleByIndex(5)),
              "short": [short_rc, count.value],
              "names": [n.nvmlSystemGetProcessName(p.pid)
                        for p in n.nvmlDeviceGetComputeRunningProcesses(h)]})
        """,
    )
    compute = [p for p in dev.processes if p.kind == "compute"]
    fields = ("pid", "used_gpu_memory", "gpu_instance_id", "compute_instance_id")
    assert got["compute"] == [[getattr(p, f) for f in fields] for p in compute]
    na = nvml_stub.NOT_AVAILABLE_UINT
    assert got["graphics"] == [[777, 64 << 20, na, na]]
    assert got["none"] == []
    assert got["short"] == [pynvml.NVML_ERROR_INSUFFICIENT_SIZE, len(compute)]
    assert got["names"] == [p.name for p in compute]
    assert sum(p.used_gpu_memory for p in compute) == dev.memory_used
    calls = fleet.calls()
    # Sizing call and fetch for each of the two listings of device 2, a single call for the
    # empty device 5, and the direct short-buffer call.
    assert calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 2 + 1 + 1 + 2
    assert calls["nvmlDeviceGetGraphicsRunningProcesses_v3"] == 2


def test_utilization_samples_only_newer_than_last_seen(fleet: nvml_stub.Fleet) -> None:
    dev = fleet.devices[1]
    newest = max(s.timestamp for s in dev.process_samples)
    first = min(s.timestamp for s in dev.process_samples)
    first_mem = dev.memory_utilization_samples[0].timestamp
    got = run_py(
        fleet,
        f"""
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(1)
        pu = lambda ts: [[s.pid, s.timeStamp, s.smUtil, s.memUtil, s.encUtil, s.decUtil]
                         for s in n.nvmlDeviceGetProcessUtilization(h, ts)]
        samples = lambda kind, ts: [[s.timeStamp, s.sampleValue.uiVal]
                                    for s in n.nvmlDeviceGetSamples(h, kind, ts)[1]]
        emit({{"all": pu(0), "after_first": pu({first}),
              "none": error_of(n.nvmlDeviceGetProcessUtilization, h, {newest}),
              "value_type": n.nvmlDeviceGetSamples(h, 1, 0)[0],
              "gpu": samples(1, 0), "mem_tail": samples(2, {first_mem}),
              "gpu_none": error_of(n.nvmlDeviceGetSamples, h, 1, 2**63)}})
        """,
    )
    rows = [
        [s.pid, s.timestamp, s.sm_util, s.mem_util, s.enc_util, s.dec_util]
        for s in dev.process_samples
    ]
    assert got["all"] == rows
    assert got["after_first"] == [r for r in rows if r[1] > first]
    assert got["none"] == pynvml.NVML_ERROR_NOT_FOUND
    assert got["value_type"] == nvml_stub.VALUE_TYPE_UNSIGNED_INT
    assert got["gpu"] == [[s.timestamp, s.value] for s in dev.gpu_utilization_samples]
    assert got["mem_tail"] == [[s.timestamp, s.value] for s in dev.memory_utilization_samples[1:]]
    assert got["gpu_none"] == pynvml.NVML_ERROR_NOT_FOUND


def test_field_values_report_per_entry_status(fleet: nvml_stub.Fleet) -> None:
    dev = fleet.devices[4]
    dev.unsupported_fields.add(nvml_stub.FI_MEMORY_TEMP)
    fleet.apply()
    served = dev.field_values()
    requested: list[tuple[int, int]] = [(fid, scope or 0) for fid, scope in served]
    requested += [(nvml_stub.FI_MEMORY_TEMP, 0), (9999, 0)]
    got = run_py(
        fleet,
        f"""
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(4)
        vals = n.nvmlDeviceGetFieldValues(h, {requested!r})
        pick = {{0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}}
        emit([[v.fieldId, v.scopeId, v.nvmlReturn, v.valueType,
               getattr(v.value, pick[v.valueType]) if v.nvmlReturn == 0 else None,
               v.timestamp > 0] for v in vals])
        """,
    )
    expected: list[list[Any]] = [
        [fid, scope or 0, 0, fv.value_type, fv.value, True] for (fid, scope), fv in served.items()
    ]
    expected += [
        [nvml_stub.FI_MEMORY_TEMP, 0, nvml_stub.NVML_ERROR_NOT_SUPPORTED, 0, None, True],
        [9999, 0, nvml_stub.NVML_ERROR_NOT_SUPPORTED, 0, None, True],
    ]
    assert got == expected
    ids = {fid for fid, _ in served}
    assert {
        nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION,
        nvml_stub.FI_PCIE_REPLAY_COUNTER,
        nvml_stub.FI_ECC_DBE_AGG_TOTAL,
        nvml_stub.FI_NVLINK_THROUGHPUT_DATA_RX,
        nvml_stub.FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
        nvml_stub.FI_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN,
        nvml_stub.FI_PCIE_COUNT_TX_BYTES,
    } <= ids
    assert served[(nvml_stub.FI_NVLINK_THROUGHPUT_DATA_TX, 17)].value == dev.nvlinks[17].tx_kib


def test_samples_serve_every_utilization_type_and_refuse_mig_handles(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=2)
    dev = fleet.devices[1]
    dev.encoder_utilization_samples = [
        nvml_stub.Sample(s.timestamp + 5, 10 + k) for k, s in enumerate(dev.gpu_utilization_samples)
    ]
    dev.decoder_utilization_samples = [
        nvml_stub.Sample(s.timestamp + 7, 20 + k) for k, s in enumerate(dev.gpu_utilization_samples)
    ]
    fleet.devices[0].enable_mig(2)
    fleet.apply()
    first_enc = dev.encoder_utilization_samples[0].timestamp
    newest_dec = dev.decoder_utilization_samples[-1].timestamp
    got = run_py(
        fleet,
        f"""
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(1)
        def samples(kind, ts):
            value_type, entries = n.nvmlDeviceGetSamples(h, kind, ts)
            return [value_type, [[s.timeStamp, s.sampleValue.uiVal] for s in entries]]
        mig = n.nvmlDeviceGetMigDeviceHandleByIndex(n.nvmlDeviceGetHandleByIndex(0), 0)
        emit({{"gpu": samples(n.NVML_GPU_UTILIZATION_SAMPLES, 0),
              "mem": samples(n.NVML_MEMORY_UTILIZATION_SAMPLES, 0),
              "enc": samples(n.NVML_ENC_UTILIZATION_SAMPLES, 0),
              "enc_tail": samples(n.NVML_ENC_UTILIZATION_SAMPLES, {first_enc}),
              "dec": samples(n.NVML_DEC_UTILIZATION_SAMPLES, 0),
              "dec_none": error_of(n.nvmlDeviceGetSamples, h, n.NVML_DEC_UTILIZATION_SAMPLES,
                                   {newest_dec}),
              "power": error_of(n.nvmlDeviceGetSamples, h, n.NVML_TOTAL_POWER_SAMPLES, 0),
              "mig": [error_of(n.nvmlDeviceGetSamples, mig, kind, 0) for kind in (1, 2, 3, 4)],
              "now_us": time.time() * 1e6}})
        """,
    )
    uint = nvml_stub.VALUE_TYPE_UNSIGNED_INT

    def rows(samples: list[nvml_stub.Sample]) -> list[list[int]]:
        return [[s.timestamp, s.value] for s in samples]

    assert got["gpu"] == [uint, rows(dev.gpu_utilization_samples)]
    assert got["mem"] == [uint, rows(dev.memory_utilization_samples)]
    assert got["enc"] == [uint, rows(dev.encoder_utilization_samples)]
    assert got["enc_tail"] == [uint, rows(dev.encoder_utilization_samples[1:])]
    assert got["dec"] == [uint, rows(dev.decoder_utilization_samples)]
    assert got["dec_none"] == pynvml.NVML_ERROR_NOT_FOUND
    assert got["power"] == nvml_stub.NVML_ERROR_NOT_SUPPORTED
    assert got["mig"] == [nvml_stub.NVML_ERROR_NOT_SUPPORTED] * 4
    # Microseconds since the epoch, like the wall clock in microseconds: within a few years of it.
    for timestamp, _ in got["gpu"][1] + got["enc"][1]:
        assert abs(timestamp - got["now_us"]) < 5 * 365 * 86400 * 1e6


def test_encoder_stats_default_to_no_sessions_and_follow_the_model(
    fleet: nvml_stub.Fleet,
) -> None:
    busy = fleet.devices[3]
    busy.encoder_session_count = 2
    busy.encoder_average_fps = 60
    busy.encoder_average_latency = 1250
    fleet.devices[4].enable_mig(1)
    fleet.apply()
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        h = [n.nvmlDeviceGetHandleByIndex(i) for i in range(5)]
        mig = n.nvmlDeviceGetMigDeviceHandleByIndex(h[4], 0)
        emit({"stats": [list(n.nvmlDeviceGetEncoderStats(x)) for x in h],
              "mig": error_of(n.nvmlDeviceGetEncoderStats, mig)})
        """,
    )
    assert got == {
        "stats": [[0, 0, 0]] * 3 + [[2, 60, 1250], [0, 0, 0]],
        "mig": nvml_stub.NVML_ERROR_NOT_SUPPORTED,
    }
    assert fleet.calls()["nvmlDeviceGetEncoderStats"] == 6


def test_pcie_throughput_counters_are_tx_and_rx_in_kib_per_second(
    fleet: nvml_stub.Fleet,
) -> None:
    dev = fleet.devices[2]
    dev.pcie_tx_throughput, dev.pcie_rx_throughput = 123_456, 654_321
    fleet.apply()
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(2)
        emit([n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES),
              n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES),
              error_of(n.nvmlDeviceGetPcieThroughput, h, n.NVML_PCIE_UTIL_COUNT)])
        """,
    )
    assert got == [123_456, 654_321, pynvml.NVML_ERROR_INVALID_ARGUMENT]


# Field ids an exporter reads, with the value type the library serves them in.
_DEVICE_FIELDS = {
    nvml_stub.FI_MEMORY_TEMP: nvml_stub.VALUE_TYPE_UNSIGNED_INT,
    nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_PCIE_REPLAY_COUNTER: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_PCIE_COUNT_TX_BYTES: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_PCIE_COUNT_RX_BYTES: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_NVLINK_LINK_COUNT: nvml_stub.VALUE_TYPE_UNSIGNED_INT,
    nvml_stub.FI_POWER_AVERAGE: nvml_stub.VALUE_TYPE_UNSIGNED_INT,
    nvml_stub.FI_POWER_INSTANT: nvml_stub.VALUE_TYPE_UNSIGNED_INT,
    nvml_stub.FI_POWER_CURRENT_LIMIT: nvml_stub.VALUE_TYPE_UNSIGNED_INT,
    **dict.fromkeys(range(3, 7), nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG),
    **dict.fromkeys(range(142, 146), nvml_stub.VALUE_TYPE_UNSIGNED_INT),
    **dict.fromkeys([*range(74, 80), *range(269, 272)], nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG),
}
_LINK_FIELDS = {
    nvml_stub.FI_NVLINK_THROUGHPUT_DATA_TX: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_NVLINK_THROUGHPUT_DATA_RX: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_NVLINK_ERROR_DL_REPLAY: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_NVLINK_ERROR_DL_RECOVERY: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_NVLINK_ERROR_DL_CRC: nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG,
    nvml_stub.FI_NVLINK_GET_STATE: nvml_stub.VALUE_TYPE_UNSIGNED_INT,
}

_FIELD_PROBE = """
n.nvmlInit()
pick = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}
def fields(index, requests):
    h = n.nvmlDeviceGetHandleByIndex(index)
    return [[v.fieldId, v.scopeId, v.nvmlReturn, v.valueType,
             getattr(v.value, pick[v.valueType]) if v.nvmlReturn == 0 else None]
            for v in n.nvmlDeviceGetFieldValues(h, requests)]
"""


def _expected_entries(
    dev: nvml_stub.Device, requests: list[tuple[int, int]], types: dict[int, int]
) -> list[list[Any]]:
    out: list[list[Any]] = []
    for fid, scope in requests:
        value = dev.field_value(fid, scope)
        if value is None:
            out.append([fid, scope, nvml_stub.NVML_ERROR_NOT_SUPPORTED, 0, None])
        else:
            out.append([fid, scope, 0, types[fid], value])
    return out


def test_exporter_field_ids_per_device_and_per_link(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=3)
    fleet.devices[1].nvlinks[5].recovery_errors = 4
    fleet.devices[1].nvlinks[6].active = False
    fleet.devices[2] = nvml_stub.make_pcie_device(2)
    fleet.apply()
    device_requests = [(fid, 0) for fid in _DEVICE_FIELDS]
    link_requests = [(fid, link) for link in range(18) for fid in _LINK_FIELDS]
    got = run_py(
        fleet,
        _FIELD_PROBE
        + f"""
emit([[fields(i, {device_requests!r}), fields(i, {link_requests!r})] for i in range(3)])
""",
    )
    for dev, (device_entries, link_entries) in zip(fleet.devices, got, strict=True):
        assert device_entries == _expected_entries(dev, device_requests, _DEVICE_FIELDS)
        assert link_entries == _expected_entries(dev, link_requests, _LINK_FIELDS)
    # field_value() itself follows the model, per device and per link.
    h200, pcie = fleet.devices[1], fleet.devices[2]
    assert h200.field_value(nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION) == h200.energy
    assert h200.field_value(nvml_stub.FI_MEMORY_TEMP) == h200.temperature_memory
    assert h200.field_value(nvml_stub.FI_PCIE_COUNT_RX_BYTES) == h200.pcie_rx_bytes
    assert h200.field_value(nvml_stub.FI_ECC_SBE_AGG_TOTAL) == h200.ecc_errors[(0, 1)]
    assert h200.field_value(nvml_stub.FI_REMAPPED_COR) == h200.remapped_rows[0]
    assert h200.field_value(nvml_stub.FI_NVLINK_LINK_COUNT) == 18
    assert h200.field_value(nvml_stub.FI_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN) == 500
    assert h200.field_value(nvml_stub.FI_NVLINK_THROUGHPUT_DATA_TX, 3) == h200.nvlinks[3].tx_kib
    assert h200.field_value(nvml_stub.FI_NVLINK_ERROR_DL_RECOVERY, 5) == 4
    assert h200.field_value(nvml_stub.FI_NVLINK_ERROR_DL_CRC, 4) == h200.nvlinks[4].crc_flit_errors
    assert h200.field_value(nvml_stub.FI_NVLINK_GET_STATE, 6) == 0
    assert h200.field_value(nvml_stub.FI_NVLINK_GET_STATE, 18) is None
    assert fleet.devices[0].field_value(nvml_stub.FI_MEMORY_TEMP) != h200.temperature_memory
    assert pcie.field_value(nvml_stub.FI_NVLINK_LINK_COUNT) == 0
    assert pcie.field_value(nvml_stub.FI_NVLINK_THROUGHPUT_DATA_TX, 0) is None
    assert pcie.field_value(nvml_stub.FI_MEMORY_TEMP) is None
    assert pcie.field_value(nvml_stub.FI_ECC_SBE_VOL_TOTAL) is None
    assert pcie.field_value(nvml_stub.FI_TOTAL_ENERGY_CONSUMPTION) == pcie.energy
    # Power: the 1 s average nvmlDeviceGetPowerUsage reports on Ampere and newer, the
    # instantaneous draw, and the enforced limit; before Ampere only the instantaneous draw,
    # which is what nvmlDeviceGetPowerUsage reports there.
    for dev in (h200, pcie):
        assert dev.field_value(nvml_stub.FI_POWER_AVERAGE) == dev.power_usage
        assert dev.field_value(nvml_stub.FI_POWER_INSTANT) == dev.power_instant != dev.power_usage
        assert dev.field_value(nvml_stub.FI_POWER_CURRENT_LIMIT) == dev.power_limit_enforced
    turing = nvml_stub.make_device(0, "Tesla T4", nvml_stub.ARCH_AMPERE - 1)
    assert turing.field_value(nvml_stub.FI_POWER_AVERAGE) is None
    assert turing.field_value(nvml_stub.FI_POWER_INSTANT) == turing.power_usage


def test_field_value_prefers_an_exact_scope_and_honours_overrides(
    fleet: nvml_stub.Fleet,
) -> None:
    dev = fleet.devices[0]
    ull = nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG
    dev.extra_fields[(9000, None)] = nvml_stub.FieldValue(ull, 1)
    dev.extra_fields[(9000, 2)] = nvml_stub.FieldValue(ull, 2)
    dev.extra_fields[(9001, None)] = nvml_stub.FieldValue(nvml_stub.VALUE_TYPE_DOUBLE, 2.5)
    dev.unsupported_fields.add(nvml_stub.FI_PCIE_REPLAY_COUNTER)
    fleet.apply()
    assert [dev.field_value(9000, s) for s in (None, 0, 2, 7)] == [1, 1, 2, 1]
    assert dev.field_value(9001) == 2.5
    assert dev.field_value(nvml_stub.FI_PCIE_REPLAY_COUNTER) is None
    assert dev.field_value(12345) is None
    got = run_py(
        fleet, _FIELD_PROBE + "emit(fields(0, [(9000, 0), (9000, 2), (9000, 7), 9001, 94]))"
    )
    assert [entry[4] for entry in got] == [1, 2, 1, 2.5, None]


def test_field_scopes_resolve_per_device_on_a_large_fleet(tmp_path: Path) -> None:
    """Each device answers from its own entries only, an exact scope beating a wildcard whether
    the config lists it before or after; on a fleet large enough that every field id appears
    on many devices, with different scopes on each."""
    fleet = nvml_stub.Fleet(tmp_path, num_devices=16)
    ull = nvml_stub.VALUE_TYPE_UNSIGNED_LONG_LONG
    for dev in fleet.devices:
        i = dev.index
        exact: dict[nvml_stub.FieldKey, nvml_stub.FieldValue] = {
            (9100, s): nvml_stub.FieldValue(ull, 100 * i + s) for s in range(i // 2 % 4)
        }
        wildcard: dict[nvml_stub.FieldKey, nvml_stub.FieldValue] = (
            {(9100, None): nvml_stub.FieldValue(ull, i)} if i % 2 == 0 else {}
        )
        # The wildcard goes first on some devices and last on others.
        dev.extra_fields.update({**wildcard, **exact} if i % 4 == 0 else {**exact, **wildcard})
    fleet.devices[15].extra_fields[(9101, 3)] = nvml_stub.FieldValue(ull, 7)
    fleet.apply()
    requests = [(9100, s) for s in range(5)] + [(9101, 3), (9101, 0)]
    got = run_py(
        fleet, _FIELD_PROBE + f"emit([[e[4] for e in fields(i, {requests!r})] for i in range(16)])"
    )
    expected = [[dev.field_value(fid, scope) for fid, scope in requests] for dev in fleet.devices]
    assert got == expected
    # Spelled out for a few devices: 0 has only a wildcard, 1 nothing, 3 exact scope 0 only,
    # 4 a wildcard listed before exact scopes 0-1, 6 one listed after exact scopes 0-2; the
    # field 9101 exists on device 15 alone, at scope 3 alone.
    assert got[0] == [0, 0, 0, 0, 0, None, None]
    assert got[1] == [None] * 7
    assert got[3] == [300, None, None, None, None, None, None]
    assert got[4] == [400, 401, 4, 4, 4, None, None]
    assert got[6] == [600, 601, 602, 6, 6, None, None]
    assert got[15] == [1500, 1501, 1502, None, None, 7, None]


def test_hopper_and_ampere_remap_rows_instead_of_retiring_pages(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=2)
    fleet.devices[1] = nvml_stub.make_device(1, "NVIDIA A100-SXM4-80GB", nvml_stub.ARCH_AMPERE)
    fleet.devices[1].remapped_rows = (3, 1, 1, 0)
    fleet.apply()
    retired_ids = sorted(nvml_stub.RETIRED_PAGE_FIELDS)
    remap_ids = sorted(nvml_stub.REMAPPED_ROW_FIELDS)
    got = run_py(
        fleet,
        _FIELD_PROBE
        + f"""
out = []
for i in range(2):
    h = n.nvmlDeviceGetHandleByIndex(i)
    out.append({{"retired": [error_of(n.nvmlDeviceGetRetiredPages_v2, h, c) for c in (0, 1)],
                "retired_fields": [e[2] for e in fields(i, {retired_ids!r})],
                "remapped": list(n.nvmlDeviceGetRemappedRows(h)),
                "remap_fields": [e[4] for e in fields(i, {remap_ids!r})]}})
emit(out)
""",
    )
    ns = nvml_stub.NVML_ERROR_NOT_SUPPORTED
    for dev, g in zip(fleet.devices, got, strict=True):
        assert not dev.retired_pages_supported
        assert g == {
            "retired": [ns, ns],
            "retired_fields": [ns] * 3,
            "remapped": list(dev.remapped_rows),
            "remap_fields": list(dev.remapped_rows),
        }


def test_pcie_card_lacks_nvlink_ecc_counters_mig_and_gpm(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=2, device_factory=nvml_stub.make_pcie_device)
    card = fleet.devices[1]
    card.retired_pages = [
        nvml_stub.RetiredPage(nvml_stub.PAGE_RETIREMENT_CAUSE_SBE, 0x1000, 11),
        nvml_stub.RetiredPage(nvml_stub.PAGE_RETIREMENT_CAUSE_SBE, 0x2000, 12),
        nvml_stub.RetiredPage(nvml_stub.PAGE_RETIREMENT_CAUSE_DBE, 0x3000, 13),
    ]
    card.retired_pages_pending = True
    card.ecc_errors[(0, 0)] = 5  # counted, but not reported while ECC is off
    fleet.apply()
    with pytest.raises(ValueError, match="no MIG"):
        card.enable_mig(1)
    ecc_ids = sorted(nvml_stub.ECC_COUNTER_FIELDS)  # 3..28
    got = run_py(
        fleet,
        _FIELD_PROBE
        + f"""
h = n.nvmlDeviceGetHandleByIndex(1)
emit({{"name": n.nvmlDeviceGetName(h), "arch": n.nvmlDeviceGetArchitecture(h),
      "cc": list(n.nvmlDeviceGetCudaComputeCapability(h)),
      "pcie": [n.nvmlDeviceGetCurrPcieLinkGeneration(h), n.nvmlDeviceGetCurrPcieLinkWidth(h)],
      "nvlink_state": error_of(n.nvmlDeviceGetNvLinkState, h, 0),
      "link_fields": fields(1, [91, (138, 0), (139, 0), (161, 0), (165, 0), 38]),
      "ecc_mode": n.nvmlDeviceGetEccMode(h),
      "ecc_totals": [error_of(n.nvmlDeviceGetTotalEccErrors, h, e, c)
                     for e in (0, 1) for c in (0, 1)],
      "ecc_fields": [e[2] for e in fields(1, {ecc_ids!r})],
      "ecc_mode_fields": [e[4] for e in fields(1, [1, 2])],
      "fans": [n.nvmlDeviceGetNumFans(h), n.nvmlDeviceGetFanSpeed_v2(h, 0)],
      "mig": [error_of(n.nvmlDeviceGetMigMode, h), n.nvmlDeviceGetMaxMigDeviceCount(h)],
      "gpm": n.nvmlGpmQueryDeviceSupport(h).isSupportedDevice,
      "sbe": n.nvmlDeviceGetRetiredPages_v2(h, 0), "dbe": n.nvmlDeviceGetRetiredPages_v2(h, 1),
      "retired_fields": [e[4] for e in fields(1, [29, 30, 31])],
      "remapped": error_of(n.nvmlDeviceGetRemappedRows, h),
      "remap_fields": [e[2] for e in fields(1, [142, 143, 144, 145])],
      "mem_temp": fields(1, [82])[0][2],
      "events": n.nvmlDeviceGetSupportedEventTypes(h)}})
""",
    )
    ns = nvml_stub.NVML_ERROR_NOT_SUPPORTED
    uint = nvml_stub.VALUE_TYPE_UNSIGNED_INT
    assert got == {
        "name": "NVIDIA L40S",
        "arch": nvml_stub.ARCH_ADA,
        "cc": [8, 9],
        "pcie": [4, 16],
        "nvlink_state": ns,
        "link_fields": [[91, 0, 0, uint, 0]]
        + [[f, 0, ns, 0, None] for f in (138, 139, 161, 165)]
        + [[38, 0, ns, 0, None]],
        "ecc_mode": [0, 0],
        "ecc_totals": [ns] * 4,
        "ecc_fields": [ns] * 26,
        "ecc_mode_fields": [0, 0],
        "fans": [1, card.fan_speeds[0]],
        "mig": [ns, 0],
        "gpm": 0,
        "sbe": [{"address": 0x1000, "timestamp": 11}, {"address": 0x2000, "timestamp": 12}],
        "dbe": [{"address": 0x3000, "timestamp": 13}],
        "retired_fields": [2, 1, 1],
        "remapped": ns,
        "remap_fields": [ns] * 4,
        "mem_temp": ns,
        "events": nvml_stub.EVENT_PSTATE | nvml_stub.EVENT_XID_CRITICAL | nvml_stub.EVENT_CLOCK,
    }
    assert [card.field_value(f) for f in (29, 30, 31)] == [2, 1, 1]
    assert card.field_value(nvml_stub.FI_ECC_CURRENT) == 0
    assert all(card.field_value(f) is None for f in nvml_stub.ECC_COUNTER_FIELDS)


def test_turning_ecc_on_brings_the_counters_back(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=1, device_factory=nvml_stub.make_pcie_device)
    child = Interactive(
        fleet,
        """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(0)
        probe = lambda: [error_of(n.nvmlDeviceGetTotalEccErrors, h, 0, 1),
                         n.nvmlDeviceGetFieldValues(h, [5])[0].nvmlReturn]
        step(probe())
        emit([n.nvmlDeviceGetTotalEccErrors(h, 0, 1),
              n.nvmlDeviceGetFieldValues(h, [5])[0].value.ullVal])
        """,
    )
    ns = nvml_stub.NVML_ERROR_NOT_SUPPORTED
    assert child.expect() == [ns, ns]
    dev = fleet.devices[0]
    dev.ecc_mode_current = dev.ecc_mode_pending = 1
    dev.ecc_errors[(0, 1)] = 7
    fleet.apply()
    child.proceed()
    assert child.expect() == [7, 7]
    child.finish()
    assert dev.field_value(nvml_stub.FI_ECC_SBE_AGG_TOTAL) == 7


def test_init_failure_then_recovery_in_the_same_process(fleet: nvml_stub.Fleet) -> None:
    fleet.fail_init(nvml_stub.NVML_ERROR_DRIVER_NOT_LOADED)
    child = Interactive(
        fleet,
        """
        step({"init": error_of(n.nvmlInit)})
        rc = error_of(n.nvmlInit)
        emit({"init": rc, "count": n.nvmlDeviceGetCount() if rc == 0 else None})
        """,
    )
    assert child.expect() == {"init": nvml_stub.NVML_ERROR_DRIVER_NOT_LOADED}
    fleet.clear_init_failure()
    child.proceed()
    assert child.expect() == {"init": 0, "count": 8}
    child.finish()


def test_calls_before_init_are_uninitialized(fleet: nvml_stub.Fleet) -> None:
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        n.nvmlShutdown()
        emit([error_of(n.nvmlDeviceGetCount), error_of(n.nvmlShutdown)])
        """,
    )
    assert got == [pynvml.NVML_ERROR_UNINITIALIZED] * 2


def test_gpu_lost_and_recovered(fleet: nvml_stub.Fleet) -> None:
    child = Interactive(
        fleet,
        """
        n.nvmlInit()
        h = [n.nvmlDeviceGetHandleByIndex(i) for i in range(3)]
        probe = lambda: [error_of(n.nvmlDeviceGetPowerUsage, x) for x in h] + [
            error_of(n.nvmlDeviceGetHandleByIndex, 2)]
        step(probe())
        step(probe())
        emit(probe())
        """,
    )
    assert child.expect() == [0, 0, 0, 0]
    fleet.set_gpu_lost(2)
    child.proceed()
    lost = nvml_stub.NVML_ERROR_GPU_IS_LOST
    assert child.expect() == [0, 0, lost, lost]
    fleet.set_gpu_lost(2, lost=False)
    child.proceed()
    assert child.expect() == [0, 0, 0, 0]
    child.finish()


def test_not_supported_faults_per_device_and_global(fleet: nvml_stub.Fleet) -> None:
    fleet.fail("nvmlDeviceGetPowerUsage", device=1)
    fleet.fail("nvmlDeviceGetTemperature")
    fleet.fail("nvmlDeviceGetEccMode", rc=pynvml.NVML_ERROR_UNKNOWN, device=0)
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        h = [n.nvmlDeviceGetHandleByIndex(i) for i in range(3)]
        emit({"power": [error_of(n.nvmlDeviceGetPowerUsage, x) for x in h],
              "temp": [error_of(n.nvmlDeviceGetTemperature, x, 0) for x in h],
              "ecc": [error_of(n.nvmlDeviceGetEccMode, x) for x in h]})
        """,
    )
    ns = nvml_stub.NVML_ERROR_NOT_SUPPORTED
    assert got == {
        "power": [0, ns, 0],
        "temp": [ns, ns, ns],
        "ecc": [pynvml.NVML_ERROR_UNKNOWN, 0, 0],
    }
    with pytest.raises(ValueError, match="nvmlDeviceGetPowerUsag"):
        fleet.fail("nvmlDeviceGetPowerUsag")


def test_missing_symbol_raises_function_not_found(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, omit=["nvmlDeviceGetTemperatureV"])
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(0)
        try:
            n.nvmlDeviceGetTemperatureV(h, 0)
            outcome = "ok"
        except n.NVMLError_FunctionNotFound:
            outcome = "function not found"
        emit([outcome, n.nvmlDeviceGetTemperature(h, 0)])
        """,
    )
    assert got == ["function not found", fleet.devices[0].temperature_gpu]


def test_blocking_call_blocks_only_its_own_thread(fleet: nvml_stub.Fleet) -> None:
    fleet.block("nvmlDeviceGetPowerUsage", 800, device=0)
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        h0, h1 = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
        slow = {}
        def blocked():
            t = time.monotonic()
            slow["value"] = n.nvmlDeviceGetPowerUsage(h0)
            slow["seconds"] = time.monotonic() - t
        worker = threading.Thread(target=blocked)
        worker.start()
        time.sleep(0.1)
        t = time.monotonic()
        fast = [n.nvmlDeviceGetPowerUsage(h1), n.nvmlDeviceGetTemperature(h0, 0),
                n.nvmlDeviceGetCount()]
        fast_seconds = time.monotonic() - t
        worker.join()
        emit({"slow": slow, "fast": fast, "fast_seconds": fast_seconds})
        """,
    )
    assert got["slow"]["value"] == fleet.devices[0].power_usage
    assert got["slow"]["seconds"] >= 0.75
    assert got["fast"] == [fleet.devices[1].power_usage, fleet.devices[0].temperature_gpu, 8]
    assert got["fast_seconds"] < 0.3


def test_xid_event_is_delivered_once_to_each_registered_set(fleet: nvml_stub.Fleet) -> None:
    fleet.queue_event(5, nvml_stub.EVENT_CLOCK, 0)
    child = Interactive(
        fleet,
        """
        n.nvmlInit()
        handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(n.nvmlDeviceGetCount())]
        sets = [n.nvmlEventSetCreate(), n.nvmlEventSetCreate()]
        for s in sets:
            for h in handles:
                n.nvmlDeviceRegisterEvents(h, n.nvmlEventTypeXidCriticalError, s)
        def wait(s, ms):
            try:
                d = n.nvmlEventSetWait_v2(s, ms)
            except n.NVMLError_Timeout:
                return "timeout"
            return [n.nvmlDeviceGetUUID(d.device), d.eventType, d.eventData,
                    d.gpuInstanceId, d.computeInstanceId]
        step(wait(sets[0], 50))
        emit([wait(sets[0], 5000), wait(sets[1], 5000), wait(sets[0], 50), wait(sets[1], 50),
              error_of(n.nvmlDeviceRegisterEvents, handles[0], 1 << 40, sets[0])])
        for s in sets:
            n.nvmlEventSetFree(s)
        """,
    )
    assert child.expect() == "timeout"
    child.proceed()
    time.sleep(0.05)
    fleet.queue_xid(3, 79)
    xid = [fleet.devices[3].uuid, nvml_stub.EVENT_XID_CRITICAL, 79, 0xFFFFFFFF, 0xFFFFFFFF]
    ns = nvml_stub.NVML_ERROR_NOT_SUPPORTED
    assert child.expect() == [xid, xid, "timeout", "timeout", ns]
    child.finish()
    assert fleet.calls()["nvmlEventSetFree"] == 2


def test_gpm_metrics_for_devices_and_mig_instances(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=2)
    fleet.devices[1].enable_mig(2)
    fleet.apply()
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        def metrics(h, ids, gi=None):
            s1, s2 = n.nvmlGpmSampleAlloc(), n.nvmlGpmSampleAlloc()
            try:
                for s in (s1, s2):
                    if gi is None:
                        n.nvmlGpmSampleGet(h, s)
                    else:
                        n.nvmlGpmMigSampleGet(h, gi, s)
                mg = n.c_nvmlGpmMetricsGet_t()
                mg.version = n.NVML_GPM_METRICS_GET_VERSION
                mg.numMetrics = len(ids)
                mg.sample1, mg.sample2 = s1, s2
                for i, m in enumerate(ids):
                    mg.metrics[i].metricId = m
                n.nvmlGpmMetricsGet(mg)
                return [[mg.metrics[i].metricId, mg.metrics[i].nvmlReturn, mg.metrics[i].value]
                        for i in range(len(ids))]
            finally:
                n.nvmlGpmSampleFree(s1)
                n.nvmlGpmSampleFree(s2)
        h0, h1 = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
        emit({"support": n.nvmlGpmQueryDeviceSupport(h0).isSupportedDevice,
              "dev": metrics(h0, [1, 2, 10, 400]), "mig": metrics(h1, [1, 2, 3], gi=2),
              "bad_gi": error_of(metrics, h1, [1], 9)})
        """,
    )
    d0, mig = fleet.devices[0], fleet.devices[1].mig_devices[1]
    ns = nvml_stub.NVML_ERROR_NOT_SUPPORTED
    assert got == {
        "support": 1,
        "dev": [[m, 0, d0.gpm_metrics[m]] for m in (1, 2, 10)] + [[400, ns, 0.0]],
        "mig": [[1, 0, mig.gpm_metrics[1]], [2, 0, mig.gpm_metrics[2]], [3, ns, 0.0]],
        "bad_gi": pynvml.NVML_ERROR_NOT_FOUND,
    }
    assert fleet.gpm_samples_outstanding() == 0
    assert fleet.calls()["nvmlGpmSampleAlloc"] == 6


def test_gpm_unsupported_before_hopper_and_leaks_are_visible(tmp_path: Path) -> None:
    fleet = nvml_stub.Fleet(tmp_path, num_devices=1, name="NVIDIA A100", architecture=7)
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(0)
        leaked = n.nvmlGpmSampleAlloc()
        emit([n.nvmlGpmQueryDeviceSupport(h).isSupportedDevice,
              error_of(n.nvmlGpmSampleGet, h, leaked), n.nvmlDeviceGetName(h)])
        """,
    )
    assert got == [0, nvml_stub.NVML_ERROR_NOT_SUPPORTED, "NVIDIA A100"]
    assert fleet.gpm_samples_outstanding() == 1


def test_mig_device_handles(fleet: nvml_stub.Fleet) -> None:
    fleet.devices[6].enable_mig(3)
    fleet.devices[6].processes.append(
        nvml_stub.Process(
            pid=9000, used_gpu_memory=1 << 30, gpu_instance_id=2, compute_instance_id=0
        )
    )
    fleet.apply()
    got = run_py(
        fleet,
        """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(6)
        out = {"mode": n.nvmlDeviceGetMigMode(h), "migs": [],
               "past_end": error_of(n.nvmlDeviceGetMigDeviceHandleByIndex, h, 3),
               "parent_gi": error_of(n.nvmlDeviceGetGpuInstanceId, h)}
        for i in range(3):
            m = n.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
            mem = n.nvmlDeviceGetMemoryInfo(m, version=n.nvmlMemory_v2)
            parent = n.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)
            uuid = n.nvmlDeviceGetUUID(m)
            out["migs"].append([
                uuid, n.nvmlDeviceGetName(m), n.nvmlDeviceGetGpuInstanceId(m),
                n.nvmlDeviceGetComputeInstanceId(m), n.nvmlDeviceIsMigDeviceHandle(m).value,
                n.nvmlDeviceGetUUID(parent),
                n.nvmlDeviceGetGpuInstanceId(n.nvmlDeviceGetHandleByUUID(uuid)),
                [mem.total, mem.free, mem.used],
                [p.pid for p in n.nvmlDeviceGetComputeRunningProcesses(m)]])
        emit(out)
        """,
    )
    dev = fleet.devices[6]
    assert got["mode"] == [1, 1]
    assert got["past_end"] == pynvml.NVML_ERROR_NOT_FOUND
    assert got["parent_gi"] == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert got["migs"] == [
        [
            m.uuid,
            m.name,
            m.gpu_instance_id,
            m.compute_instance_id,
            1,
            dev.uuid,
            m.gpu_instance_id,
            [m.memory_total, m.memory_free, m.memory_used],
            [9000] if m.gpu_instance_id == 2 else [],
        ]
        for m in dev.mig_devices
    ]


def test_call_counters_are_live_and_resettable(fleet: nvml_stub.Fleet) -> None:
    child = Interactive(
        fleet,
        """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(0)
        for _ in range(5):
            n.nvmlDeviceGetPowerUsage(h)
        step("counted")
        n.nvmlDeviceGetPowerUsage(h)
        emit("done")
        """,
    )
    assert child.expect() == "counted"
    calls = fleet.calls()
    assert calls["nvmlDeviceGetPowerUsage"] == 5
    assert calls["nvmlInitWithFlags"] == 1
    assert set(calls) == set(nvml_stub.SYMBOLS)
    fleet.reset_calls()
    child.proceed()
    assert child.expect() == "done"
    child.finish()
    assert {k: v for k, v in fleet.calls().items() if v} == {"nvmlDeviceGetPowerUsage": 1}


def test_threads_read_consistent_values_while_the_config_changes(
    fleet: nvml_stub.Fleet,
) -> None:
    child = Interactive(
        fleet,
        """
        n.nvmlInit()
        handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
        seen, stop = set(), threading.Event()
        def hammer(h):
            while not stop.is_set():
                seen.add(n.nvmlDeviceGetPowerUsage(h))
                n.nvmlDeviceGetFieldValues(h, [83, 82, (138, 1)])
                n.nvmlDeviceGetMemoryInfo(h, version=n.nvmlMemory_v2)
        threads = [threading.Thread(target=hammer, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        step("running")
        stop.set()
        for t in threads:
            t.join()
        emit(sorted(seen))
        """,
    )
    assert child.expect() == "running"
    written = {d.power_usage for d in fleet.devices}
    for round_ in range(1, 40):
        for d in fleet.devices:
            d.power_usage = 100_000 * round_ + d.index
            written.add(d.power_usage)
        fleet.apply()
        time.sleep(0.005)
    child.proceed()
    seen = set(child.expect())
    child.finish()
    assert seen <= written
    assert len(seen) > len(fleet.devices)


def test_fleet_without_directory_cleans_up() -> None:
    with nvml_stub.Fleet(num_devices=1) as fleet:
        directory = fleet.directory
        assert fleet.config_path.exists()
        assert fleet.env({"LD_LIBRARY_PATH": "/opt/x"})["LD_LIBRARY_PATH"] == (
            f"{fleet.library_dir}:/opt/x"
        )
    assert not directory.exists()


def test_sample_size_query_answers_the_buffer_capacity_like_real_nvml(
    fleet: nvml_stub.Fleet,
) -> None:
    fleet.devices[1].sample_capacity = 120
    fleet.apply()
    newest = max(s.timestamp for s in fleet.devices[0].gpu_utilization_samples)
    got = run_py(
        fleet,
        f"""
        import ctypes
        n.nvmlInit()
        fn = n._nvmlGetFunctionPointer("nvmlDeviceGetSamples")
        def size(index, since):
            count, value_type = ctypes.c_uint(7), ctypes.c_uint(9)
            h = n.nvmlDeviceGetHandleByIndex(index)
            rc = fn(h, ctypes.c_uint(1), ctypes.c_ulonglong(since), ctypes.byref(value_type),
                    ctypes.byref(count), None)
            return [rc, count.value, value_type.value]
        count = ctypes.c_uint(0)
        buf = (n.c_nvmlSample_t * 4)()
        zero = fn(n.nvmlDeviceGetHandleByIndex(0), ctypes.c_uint(1), ctypes.c_ulonglong(0),
                  ctypes.byref(ctypes.c_uint()), ctypes.byref(count), buf)
        emit({{"all": size(0, 0), "nothing_newer": size(0, {newest}), "bigger": size(1, 0),
              "zero_count": zero}})
        """,
    )
    uint = nvml_stub.VALUE_TYPE_UNSIGNED_INT
    assert got == {
        "all": [0, 100, uint],
        "nothing_newer": [0, 100, uint],  # the size of the buffer, not of what is new
        "bigger": [0, 120, uint],
        "zero_count": pynvml.NVML_ERROR_INVALID_ARGUMENT,
    }


# The exporter's NVML driver in a subprocess, against the stand-in through the real pynvml.
_DRIVER = f"""
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from exporter.nvml.pynvml_driver import PynvmlDriver
d = PynvmlDriver()
d.init()
h = [d.device_handle(i) for i in range(d.device_count())]
"""


def test_driver_reads_samples_in_one_call_after_asking_each_buffer_size_once(
    fleet: nvml_stub.Fleet,
) -> None:
    dev = fleet.devices[3]
    first_ts = dev.gpu_utilization_samples[0].timestamp
    newest = dev.gpu_utilization_samples[-1].timestamp
    got = run_py(
        fleet,
        _DRIVER
        + f"""
reads = [d.samples(h[3], 1, 0), d.samples(h[3], 1, {first_ts}), d.samples(h[3], 1, {newest}),
         d.samples(h[3], 2, 0), d.samples(h[2], 1, 0)]
emit(reads)
""",
    )
    rows = [[s.timestamp, float(s.value)] for s in dev.gpu_utilization_samples]
    assert got == [
        rows,
        rows[1:],
        [],  # NOT_FOUND: nothing newer
        [[s.timestamp, float(s.value)] for s in dev.memory_utilization_samples],
        [[s.timestamp, float(s.value)] for s in fleet.devices[2].gpu_utilization_samples],
    ]
    # One size query per device and sampling type (3 of them), one call per read (5).
    assert fleet.calls()["nvmlDeviceGetSamples"] == 3 + 5


def test_driver_retries_once_with_the_size_the_driver_asks_for(fleet: nvml_stub.Fleet) -> None:
    dev = fleet.devices[0]
    dev.sample_capacity = 2  # a buffer that has grown since its size was asked
    last = dev.gpu_utilization_samples[-1].timestamp
    # More than the driver's room at least (MIN_SAMPLE_CAPACITY), so the answer does not fit.
    more = range(1, MIN_SAMPLE_CAPACITY + 10)
    dev.gpu_utilization_samples += [nvml_stub.Sample(last + 1000 * k, k % 100) for k in more]
    fleet.apply()
    got = run_py(
        fleet,
        _DRIVER
        + """
emit([d.samples(h[0], 1, 0), d.samples(h[0], 1, 0)])
""",
    )
    rows = [[s.timestamp, float(s.value)] for s in dev.gpu_utilization_samples]
    assert got == [rows, rows]
    # Size (2, so the floor), data: INSUFFICIENT_SIZE, data with room; then the size is known.
    assert fleet.calls()["nvmlDeviceGetSamples"] == 3 + 1


# NVML_VALUE_NOT_AVAILABLE for a process's memory (WDDM on Windows).
NOT_AVAILABLE_ULL = 2**64 - 1


def test_driver_lists_processes_in_one_call_and_grows_its_buffer_once(
    fleet: nvml_stub.Fleet,
) -> None:
    many = fleet.devices[1]
    many.processes = [
        nvml_stub.Process(pid=20_000 + k, used_gpu_memory=(k + 1) << 20) for k in range(70)
    ]
    # A graphics process in a MIG instance whose memory the driver cannot tell.
    many.processes.append(nvml_stub.Process(20_100, NOT_AVAILABLE_ULL, "graphics", "x", 1, 0))
    fleet.devices[2].processes = []
    fleet.apply()
    got = run_py(
        fleet,
        _DRIVER
        + """
import dataclasses
rows = lambda infos: [dataclasses.astuple(p) for p in infos]
emit([rows(d.compute_processes(h[0])), rows(d.graphics_processes(h[0])),
      rows(d.compute_processes(h[2])),
      rows(d.compute_processes(h[1])), rows(d.compute_processes(h[1])),
      rows(d.graphics_processes(h[1]))])
""",
    )
    compute0 = [[p.pid, p.used_gpu_memory, None, None] for p in fleet.devices[0].processes]
    compute1 = [[p.pid, p.used_gpu_memory, None, None] for p in many.processes[:70]]
    assert got == [compute0, [], [], compute1, compute1, [[20_100, None, 1, 0]]]
    calls = fleet.calls()
    # One call per listing, and one more for the 70 processes that did not fit the first time.
    assert calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 4 + 1
    assert calls["nvmlDeviceGetGraphicsRunningProcesses_v3"] == 2
