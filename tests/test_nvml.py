"""The NVML error policy, init backoff and enumeration, independent of any driver."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pynvml
import pytest
from fakes import FakeClock

from exporter import nvml
from exporter.config import DeviceSelection
from exporter.nvml import Device, DeviceIdentity, DeviceLost, NvmlError, PynvmlDriver, Session


class ScriptedDriver:
    """Answers each call from a script: a value, or an exception to raise."""

    def __init__(self, devices: int = 3) -> None:
        self.calls: dict[str, int] = {}
        self.script: dict[str, Any] = {}
        self.devices = devices
        self.init_error: Exception | None = None

    def _answer(self, name: str, default: Any) -> Any:
        self.calls[name] = self.calls.get(name, 0) + 1
        answer = self.script.get(name, default)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def init(self) -> None:
        self.calls["init"] = self.calls.get("init", 0) + 1
        if self.init_error is not None:
            raise self.init_error

    def shutdown(self) -> None:
        self.calls["shutdown"] = self.calls.get("shutdown", 0) + 1

    def driver_version(self) -> str:
        return "999.1"

    def cuda_driver_version(self) -> int:
        return 12040

    def device_count(self) -> int:
        return self.devices

    def device_handle(self, index: int) -> Any:
        answer = self.script.get(f"handle{index}")
        if isinstance(answer, Exception):
            raise answer
        return index

    def uuid(self, handle: Any) -> str:
        return f"GPU-{handle}"

    def name(self, handle: Any) -> str:
        return "Test GPU"

    def pci_bus_id(self, handle: Any) -> str:
        return f"00000000:{handle:02X}:00.0"

    def serial(self, handle: Any) -> str:
        return str(self._answer("serial", "S1"))

    def vbios_version(self, handle: Any) -> str:
        return "1.0"

    def architecture(self, handle: Any) -> int:
        return 9

    def minor_number(self, handle: Any) -> int:
        return int(handle)

    def power_usage(self, handle: Any) -> int:
        return int(self._answer("power_usage", 123_000))


def device(driver: ScriptedDriver) -> Device:
    return Device(driver, 0, DeviceIdentity(index=0, uuid="GPU-0"))  # type: ignore[arg-type]


def test_value_is_read_in_nvml_units() -> None:
    drv = ScriptedDriver()
    assert device(drv).read(drv.power_usage) == 123_000


@pytest.mark.parametrize(
    "error",
    [
        NvmlError(nvml.NOT_SUPPORTED),
        NvmlError(nvml.NO_PERMISSION),
        pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND),
        pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED),
        pynvml.NVMLLibraryMismatchError("unversioned symbol missing"),
    ],
    ids=[
        "not_supported",
        "no_permission",
        "function_not_found",
        "pynvml_not_supported",
        "library_mismatch",
    ],
)
def test_absent_value_is_remembered_and_not_asked_again(error: Exception) -> None:
    drv = ScriptedDriver()
    drv.script["power_usage"] = error
    dev = device(drv)
    for _ in range(5):
        assert dev.read(drv.power_usage) is None
    assert drv.calls["power_usage"] == 1
    assert not dev.errors
    assert dev.is_absent(drv.power_usage)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (nvml.GPU_IS_LOST, "gpu_is_lost"),
        (nvml.RESET_REQUIRED, "reset_required"),
        (nvml.GPU_NOT_FOUND, "gpu_not_found"),
    ],
)
def test_lost_gpu_raises_device_lost(code: int, reason: str) -> None:
    drv = ScriptedDriver()
    drv.script["power_usage"] = pynvml.NVMLError(code)
    with pytest.raises(DeviceLost) as lost:
        device(drv).read(drv.power_usage)
    assert lost.value.reason == reason


def test_other_errors_are_counted_logged_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    drv = ScriptedDriver()
    drv.script["power_usage"] = pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    dev = device(drv)
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            assert dev.read(drv.power_usage) is None
    assert drv.calls["power_usage"] == 4  # transient: asked again next time
    assert dev.errors == {"unknown": 4}
    assert len([r for r in caplog.records if "NVML call failed" in r.message]) == 1
    del drv.script["power_usage"]
    assert dev.read(drv.power_usage) == 123_000


def test_a_bug_is_not_mistaken_for_an_nvml_error() -> None:
    drv = ScriptedDriver()
    drv.script["power_usage"] = ZeroDivisionError()
    with pytest.raises(ZeroDivisionError):
        device(drv).read(drv.power_usage)


def test_cached_reads_static_values_once() -> None:
    drv = ScriptedDriver()
    dev = device(drv)
    assert [dev.cached(drv.serial) for _ in range(3)] == ["S1"] * 3
    assert drv.calls["serial"] == 1


def test_init_retries_with_capped_exponential_backoff(caplog: pytest.LogCaptureFixture) -> None:
    drv = ScriptedDriver()
    drv.init_error = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    clock = FakeClock()
    session = Session(drv, clock=clock)  # type: ignore[arg-type]
    attempts_at: list[float] = []
    with caplog.at_level(logging.WARNING):
        for _ in range(1200):  # two minutes in 100 ms steps
            if session.start():
                break
            if drv.calls.get("init", 0) > len(attempts_at):
                attempts_at.append(round(clock.now - 1000.0, 1))
            clock.advance(0.1)
    gaps = [b - a for a, b in itertools.pairwise(attempts_at)]
    assert gaps[:5] == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0], abs=0.11)
    assert max(gaps) == pytest.approx(30.0, abs=0.11)
    assert session.last_error == "driver_not_loaded"
    warnings = [r for r in caplog.records if "NVML not available" in r.message]
    assert len(warnings) == 1  # no log line per attempt

    drv.init_error = None
    clock.advance(31)
    assert session.start() is True
    assert [d.uuid for d in session.devices] == ["GPU-0", "GPU-1", "GPU-2"]
    assert session.system.driver_version == "999.1"
    assert session.system.cuda_driver_version == "12.4"


def test_enumeration_reads_static_identity_once() -> None:
    drv = ScriptedDriver(devices=2)
    session = Session(drv)  # type: ignore[arg-type]
    assert session.start()
    ident = session.devices[1].identity
    assert ident == DeviceIdentity(
        index=1,
        uuid="GPU-1",
        name="Test GPU",
        pci_bus_id="00000000:01:00.0",
        serial="S1",
        vbios_version="1.0",
        architecture="hopper",
        minor_number=1,
    )


def test_a_gpu_that_cannot_be_opened_does_not_hide_the_others() -> None:
    drv = ScriptedDriver(devices=3)
    drv.script["handle1"] = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    session = Session(drv)  # type: ignore[arg-type]
    assert session.start()
    assert [(d.index, d.down_reason) for d in session.devices] == [
        (0, None),
        (1, "gpu_is_lost"),
        (2, None),
    ]


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (DeviceSelection(include=(2, "GPU-0")), [0, 2]),
        (DeviceSelection(include=(1,)), [1]),
        (DeviceSelection(include=("00000000:02:00.0",)), [2]),
        (DeviceSelection(exclude=("01:00.0",)), [0, 2]),
    ],
)
def test_device_selection_by_index_uuid_or_pci_bus_id(
    selection: DeviceSelection, expected: list[int]
) -> None:
    session = Session(ScriptedDriver(devices=3), selection)  # type: ignore[arg-type]
    assert session.start()
    assert [d.index for d in session.devices] == expected
    assert session.total_devices == 3


def test_newest_versioned_call_falls_back_once_to_the_old_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []

    class V1:
        total, used, free = 100, 60, 40

    def memory_info(handle: object, version: object = None) -> V1:
        calls.append(version)
        if version is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return V1()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory_info)
    driver = PynvmlDriver()
    first = driver.memory(object())
    second = driver.memory(object())
    assert first == second == nvml.MemoryInfo(total=100, used=60, free=40, reserved=None)
    assert calls == [pynvml.nvmlMemory_v2, None, None]  # v2 tried once, then v1 only


def test_an_older_binding_without_the_newer_wrapper_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(pynvml, "nvmlDeviceGetTemperatureV")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", lambda handle, sensor: 61)
    assert PynvmlDriver().temperature(object(), nvml.TEMPERATURE_GPU) == 61


@pytest.mark.parametrize("code", [nvml.NOT_FOUND, nvml.NO_DATA])
def test_nothing_to_report_is_neither_an_error_nor_remembered(code: int) -> None:
    drv = ScriptedDriver()
    drv.script["power_usage"] = NvmlError(code)
    dev = device(drv)
    assert dev.read(drv.power_usage) is None
    assert dev.read(drv.power_usage) is None
    assert drv.calls["power_usage"] == 2 and not dev.errors


@pytest.mark.parametrize("code", [nvml.UNINITIALIZED, nvml.DRIVER_NOT_LOADED, 18])
def test_library_wide_failures_end_the_session(code: int) -> None:
    drv = ScriptedDriver()
    drv.script["power_usage"] = pynvml.NVMLError(code)
    with pytest.raises(nvml.SessionLost):
        device(drv).read(drv.power_usage)


def test_every_nvml_error_code_has_a_name() -> None:
    assert nvml.error_name(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH) == "lib_rm_version_mismatch"
    assert nvml.error_name(pynvml.NVML_ERROR_IN_USE) == "in_use"
