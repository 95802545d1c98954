"""The NVML error policy, init backoff and enumeration, independent of any driver; and the
reads collectors leave out while they cannot tell anything new (power from field values, video
engine buffers while the engines are idle)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import pynvml
import pytest
from fakes import FakeClock

from exporter import nvml
from exporter.collectors import COLLECTORS
from exporter.collectors.base import Emitter
from exporter.collectors.busy import BUFFER_READ_EVERY, BUFFER_READ_SECONDS
from exporter.collectors.pcie import PcieCollector
from exporter.collectors.power import PowerCollector
from exporter.collectors.shared import SampleContext
from exporter.collectors.video import (
    DECODER_BUSY,
    DECODER_UTILIZATION,
    ENCODER_BUSY,
    ENCODER_UTILIZATION,
    VideoCollector,
)
from exporter.config import DeviceSelection
from exporter.nvml import (
    Device,
    DeviceIdentity,
    DeviceLost,
    EncoderStats,
    NvmlError,
    Session,
)
from exporter.nvml.pynvml_driver import PynvmlDriver

# The config's default sampling.slow_fields_interval, and the fields the collectors' tables mark
# slow, as the sampler passes them.
SLOW = 10.0
SLOW_FIELDS = frozenset[int]().union(*(c.slow_fields for c in COLLECTORS.values()))


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
        NvmlError(nvml.FUNCTION_NOT_FOUND),
    ],
    ids=[
        "not_supported",
        "no_permission",
        "function_not_found",
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
    drv.script["power_usage"] = NvmlError(code)
    with pytest.raises(DeviceLost) as lost:
        device(drv).read(drv.power_usage)
    assert lost.value.reason == reason


def test_other_errors_are_counted_logged_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    drv = ScriptedDriver()
    drv.script["power_usage"] = NvmlError(nvml.UNKNOWN)
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
    drv.init_error = NvmlError(nvml.DRIVER_NOT_LOADED)
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
    drv.script["handle1"] = NvmlError(nvml.GPU_IS_LOST)
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


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED), nvml.NOT_SUPPORTED),
        (pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST), nvml.GPU_IS_LOST),
        (pynvml.NVMLLibraryMismatchError("unversioned symbol missing"), nvml.FUNCTION_NOT_FOUND),
    ],
    ids=["not_supported", "gpu_is_lost", "library_mismatch"],
)
def test_pynvml_errors_become_nvml_errors_at_the_driver(
    monkeypatch: pytest.MonkeyPatch, error: Exception, code: int
) -> None:
    def power_usage(handle: object) -> int:
        raise error

    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", power_usage)
    with pytest.raises(NvmlError) as raised:
        PynvmlDriver().power_usage(object())
    assert raised.value.code == code


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
    drv.script["power_usage"] = NvmlError(code)
    with pytest.raises(nvml.SessionLost):
        device(drv).read(drv.power_usage)


def test_every_nvml_error_code_has_its_nvml_h_name() -> None:
    codes = {n: v for n, v in vars(pynvml).items() if n.startswith("NVML_ERROR_")}
    assert len(codes) > 30
    for name, code in codes.items():
        assert nvml.error_name(code) == name.removeprefix("NVML_ERROR_").lower()


class FieldDriver(ScriptedDriver):
    """Answers field values from `fields` (id -> value); other ids are NOT_SUPPORTED."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[int, float] = {}
        self.requests: list[list[tuple[int, int]]] = []

    def field_values(self, handle: Any, requests: Any) -> list[tuple[int, float | None]]:
        self.requests.append(list(requests))
        return [
            (nvml.SUCCESS, self.fields[fid]) if fid in self.fields else (nvml.NOT_SUPPORTED, None)
            for fid, _ in requests
        ]


def test_an_unsupported_field_is_remembered_and_no_longer_requested() -> None:
    drv = FieldDriver()
    drv.fields = {nvml.FI_POWER_INSTANT: 321_000}
    dev = device(drv)
    wanted = [(nvml.FI_POWER_AVERAGE, 0), (nvml.FI_POWER_INSTANT, 0)]
    dev.fetch_fields(wanted, SLOW, SLOW_FIELDS)
    assert not dev.field_absent(nvml.FI_POWER_AVERAGE)  # not known until its entry is read
    assert dev.field(nvml.FI_POWER_AVERAGE) is None
    assert dev.field(nvml.FI_POWER_INSTANT) == 321_000
    assert dev.field_absent(nvml.FI_POWER_AVERAGE)
    assert not dev.field_absent(nvml.FI_POWER_INSTANT)
    assert not dev.errors
    dev.fetch_fields(wanted, SLOW, SLOW_FIELDS)
    assert drv.requests == [wanted, [(nvml.FI_POWER_INSTANT, 0)]]


def _clocked(drv: ScriptedDriver) -> tuple[Device, FakeClock]:
    dev = device(drv)
    clock = FakeClock()
    dev.clock = clock
    return dev, clock


def test_slow_fields_join_the_batch_every_ten_seconds_and_stand_in_between() -> None:
    drv = FieldDriver()
    drv.fields = {nvml.FI_POWER_AVERAGE: 300_000, nvml.FI_TOTAL_ENERGY_CONSUMPTION: 7_000}
    dev, clock = _clocked(drv)
    wanted = [(nvml.FI_TOTAL_ENERGY_CONSUMPTION, 0), (nvml.FI_POWER_AVERAGE, 0)]
    assert nvml.FI_TOTAL_ENERGY_CONSUMPTION in SLOW_FIELDS
    seen = []
    for _ in range(12):
        dev.fetch_fields(wanted, SLOW, SLOW_FIELDS)
        seen.append(dev.field(nvml.FI_TOTAL_ENERGY_CONSUMPTION))
        drv.fields[nvml.FI_TOTAL_ENERGY_CONSUMPTION] += 1_000
        clock.advance(1.0)
    asked = [len(r) for r in drv.requests]
    assert asked == [2] + [1] * 9 + [2] + [1]
    # The last answer stands until the next read: one call per sample all along.
    assert seen == [7_000] * 10 + [17_000] * 2


def test_a_failed_slow_field_is_asked_again_next_sample_and_an_answer_then_stands() -> None:
    drv = FieldDriver()
    dev, clock = _clocked(drv)
    fails = [True, True, False]

    def answer(handle: Any, requests: Any) -> list[tuple[int, float | None]]:
        drv.requests.append(list(requests))
        # An error that is neither "unsupported" nor "no value", then an answer.
        failing = fails.pop(0) if fails else False
        return [(999, None) if failing else (nvml.SUCCESS, 42) for _ in requests]

    drv.field_values = answer  # type: ignore[method-assign]
    seen = []
    for _ in range(6):
        dev.fetch_fields([(nvml.FI_PCIE_REPLAY_COUNTER, 0)], SLOW, SLOW_FIELDS)
        seen.append(dev.field(nvml.FI_PCIE_REPLAY_COUNTER))
        clock.advance(1.0)
    # Each failed read counts once and is retried at the next sample; the answer then stands
    # without another call until the interval has passed.
    assert seen == [None, None, 42, 42, 42, 42]
    assert sum(dev.errors.values()) == 2
    assert len(drv.requests) == 3


def test_a_slow_field_new_to_the_request_list_is_read_at_once() -> None:
    drv = FieldDriver()
    drv.fields = {nvml.FI_PERF_POLICY_THERMAL: 5, nvml.FI_TOTAL_ENERGY_CONSUMPTION: 9}
    dev, clock = _clocked(drv)
    dev.fetch_fields([(nvml.FI_TOTAL_ENERGY_CONSUMPTION, 0)], SLOW, SLOW_FIELDS)
    clock.advance(1.0)
    dev.fetch_fields(
        [(nvml.FI_TOTAL_ENERGY_CONSUMPTION, 0), (nvml.FI_PERF_POLICY_THERMAL, 0)], SLOW, SLOW_FIELDS
    )
    assert dev.field(nvml.FI_PERF_POLICY_THERMAL) == 5
    assert dev.field(nvml.FI_TOTAL_ENERGY_CONSUMPTION) == 9


class PowerFieldDriver(FieldDriver):
    def power_limit_default(self, handle: Any) -> int:
        return 700_000

    def total_energy(self, handle: Any) -> int:
        return int(self._answer("total_energy", 9_000))

    def pcie_throughput(self, handle: Any, counter: int) -> int:
        return int(self._answer("pcie_throughput", 100))

    def enforced_power_limit(self, handle: Any) -> int:
        return 700_000

    def pcie_link_generation(self, handle: Any) -> int:
        return 5

    pcie_link_width = pcie_max_link_generation = pcie_max_link_width = pcie_link_generation

    def power_limit_constraints(self, handle: Any) -> tuple[int, int]:
        return 200_000, 700_000


def test_a_failed_power_entry_counts_once_and_does_not_fall_back_to_the_call() -> None:
    drv = PowerFieldDriver()
    drv.fields = {nvml.FI_POWER_CURRENT_LIMIT: 650_000, nvml.FI_TOTAL_ENERGY_CONSUMPTION: 5}
    failing = {nvml.FI_POWER_AVERAGE: 999}  # an error that is neither "unsupported" nor "no value"

    def answer(handle: Any, requests: Any) -> list[tuple[int, float | None]]:
        return [
            (failing[fid], None) if fid in failing else (nvml.SUCCESS, drv.fields[fid])
            for fid, _ in requests
        ]

    drv.field_values = answer  # type: ignore[method-assign]
    dev = device(drv)
    collector = PowerCollector()
    for sample in range(1, 4):
        dev.fetch_fields(collector.fields(dev), SLOW, SLOW_FIELDS)
        out = Emitter()
        collector.collect(dev, out, SampleContext())
        names = {spec.name for spec, _, _ in out.samples}
        assert "nvml_power_watts" not in names  # missing this sample, not read a second way
        assert {"nvml_power_limit_watts", "nvml_energy_joules_total"} <= names
        assert sum(dev.errors.values()) == sample  # one failed read per sample
    assert drv.calls.get("power_usage", 0) == 0
    assert dev.field_failed(nvml.FI_POWER_AVERAGE) and not dev.field_absent(nvml.FI_POWER_AVERAGE)


class VideoDriver(ScriptedDriver):
    """An encoder and a decoder with driver sample buffers that fill as `now` advances.

    `buffers[type]` holds (timestamp in microseconds, percent); a read returns the samples newer
    than its `since` and no newer than `now`, and the instantaneous value is the newest sample
    so far. `sessions` is what nvmlDeviceGetEncoderStats says.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now_us = 0
        self.sessions = 0
        self.buffers: dict[int, list[tuple[int, float]]] = {
            nvml.ENC_UTILIZATION_SAMPLES: [],
            nvml.DEC_UTILIZATION_SAMPLES: [],
        }
        self.reads: dict[int, list[int]] = {t: [] for t in self.buffers}
        self.asked: dict[int, list[int]] = {t: [] for t in self.buffers}
        self.instant_supported = True

    def encoder_stats(self, handle: Any) -> EncoderStats:
        return EncoderStats(self.sessions, 30 if self.sessions else 0, 0)

    def samples(self, handle: Any, sample_type: int, since_us: int) -> list[tuple[int, float]]:
        self.reads[sample_type].append(self.now_us)
        return [(t, v) for t, v in self.buffers[sample_type] if since_us < t <= self.now_us]

    def _instant(self, sample_type: int) -> int:
        if not self.instant_supported:
            raise NvmlError(nvml.NOT_SUPPORTED)
        self.asked[sample_type].append(self.now_us)
        newest = [v for t, v in self.buffers[sample_type] if t <= self.now_us]
        return round(newest[-1]) if newest else 0

    def encoder_utilization(self, handle: Any) -> int:
        return self._instant(nvml.ENC_UTILIZATION_SAMPLES)

    def decoder_utilization(self, handle: Any) -> int:
        return self._instant(nvml.DEC_UTILIZATION_SAMPLES)


Outputs = dict[tuple[str, tuple[str, ...]], float]


def _video_world() -> tuple[VideoDriver, Callable[..., Outputs]]:
    drv = VideoDriver()
    dev = device(drv)
    clock = FakeClock(start=0.0)
    dev.clock = clock
    # A driver sample every 200 ms for a minute, idle unless a test says otherwise.
    for buffer in drv.buffers.values():
        buffer.extend((200_000 * k, 0.0) for k in range(1, 301))
    collector = VideoCollector()

    def sample(nvdec_idle: bool = False, step: float = 1.0) -> Outputs:
        """One exporter sample, `step` seconds after the previous one; `nvdec_idle` stands for
        the gpm collector having measured the decoders at 0 in it."""
        clock.advance(step)
        drv.now_us = round(clock.now * 1e6)
        out = Emitter()
        context = SampleContext()
        context.gpm_nvdec_idle = nvdec_idle
        collector.collect(dev, out, context)
        return {(spec.name, labels): value for spec, labels, value in out.samples}

    return drv, sample


def _seconds(stamps: list[int]) -> list[int]:
    return [t // 1_000_000 for t in stamps]


def test_encoder_value_is_asked_for_only_while_a_session_is_open() -> None:
    drv, sample = _video_world()
    sessions = [0] * 12 + [1] * 3 + [0] * 11
    for open_sessions in sessions:
        drv.sessions = open_sessions
        sample()
    # The first sample (no value yet), the three samples with a session and the one after it
    # (the session may have run until just before it).
    assert _seconds(drv.asked[nvml.ENC_UTILIZATION_SAMPLES]) == [1, 13, 14, 15, 16]
    # The buffer, for the counter: the first sample and every tenth after it, sessions or not.
    assert _seconds(drv.reads[nvml.ENC_UTILIZATION_SAMPLES]) == [1, 11, 21]
    assert BUFFER_READ_EVERY == 10
    # Without GPM in this sample the decoder's value is asked for every time.
    assert len(drv.asked[nvml.DEC_UTILIZATION_SAMPLES]) == len(sessions)


def test_at_long_intervals_the_buffer_is_read_before_it_wraps() -> None:
    drv, sample = _video_world()
    for _ in range(7):
        sample(step=4.0)  # 4 s apart: ten samples would be 40 s, past the ~16 s buffer
    # Never BUFFER_READ_SECONDS or more apart (the next sample would be too late), not every
    # 10th sample.
    assert _seconds(drv.reads[nvml.ENC_UTILIZATION_SAMPLES]) == [4, 12, 20, 28]
    assert BUFFER_READ_SECONDS < 14


def test_at_nine_second_intervals_every_sample_reads_and_no_busy_time_is_lost() -> None:
    drv, sample = _video_world()
    drv.sessions = 1
    enc = drv.buffers[nvml.ENC_UTILIZATION_SAMPLES]
    enc[:] = [(t, 100.0) for t, _ in enc]
    first = sample(step=9.0)[(ENCODER_BUSY.name, ())]
    last = first
    for _ in range(5):
        last = sample(step=9.0)[(ENCODER_BUSY.name, ())]
    assert len(drv.reads[nvml.ENC_UTILIZATION_SAMPLES]) == 6
    assert last - first == pytest.approx(5 * 9.0)


def test_a_session_between_two_samples_is_counted_once_by_the_next_buffer_read() -> None:
    drv, sample = _video_world()
    enc = drv.buffers[nvml.ENC_UTILIZATION_SAMPLES]
    # A session from 3 s to 4 s at 80 %, and another in the last second before the buffer read
    # at 11 s, at 25 %; both opened and closed between two exporter samples.
    enc[:] = [(t, 80.0 if 3e6 < t <= 4e6 else 25.0 if 10e6 < t <= 11e6 else v) for t, v in enc]
    first = sample()
    assert first[(ENCODER_UTILIZATION.name, ())] == 0.0
    for _ in range(BUFFER_READ_EVERY - 1):
        between = sample()
        assert between[(ENCODER_UTILIZATION.name, ())] == 0.0
        assert between[(ENCODER_BUSY.name, ())] == 0.0
    read = sample()  # at 11 s
    assert read[(ENCODER_BUSY.name, ())] == pytest.approx(0.8 * 1.0 + 0.25 * 1.0)
    # No session at either end of the interval: the gauge stays 0 without a call.
    assert read[(ENCODER_UTILIZATION.name, ())] == 0.0
    for _ in range(2 * BUFFER_READ_EVERY):
        later = sample()
        assert later[(ENCODER_BUSY.name, ())] == read[(ENCODER_BUSY.name, ())]
    assert len(drv.reads[nvml.ENC_UTILIZATION_SAMPLES]) == 4
    assert len(drv.asked[nvml.ENC_UTILIZATION_SAMPLES]) == 1


def test_without_the_instantaneous_value_the_buffer_is_read_every_sample() -> None:
    drv, sample = _video_world()
    drv.instant_supported = False
    drv.sessions = 1
    drv.buffers[nvml.ENC_UTILIZATION_SAMPLES].clear()  # nothing sampled yet
    for _ in range(3):
        got = sample()
        assert (ENCODER_UTILIZATION.name, ()) not in got
    assert len(drv.reads[nvml.ENC_UTILIZATION_SAMPLES]) == 3
    enc = drv.buffers[nvml.ENC_UTILIZATION_SAMPLES]
    enc.extend((t, 30.0) for t in range(3_200_000, 5_000_001, 200_000))
    got = sample()
    # After empty reads every sample is new: from 3.2 s, its period taken as the next one's.
    assert got[(ENCODER_UTILIZATION.name, ())] == pytest.approx(0.3)
    assert got[(ENCODER_BUSY.name, ())] == pytest.approx(0.3 * 1.0)
    got = sample()
    assert got[(ENCODER_BUSY.name, ())] == pytest.approx(0.3 * 2.0)
    assert len(drv.reads[nvml.ENC_UTILIZATION_SAMPLES]) == 5


def test_decoder_value_is_not_asked_for_while_gpm_measures_the_decoders_idle() -> None:
    drv, sample = _video_world()
    dec = drv.buffers[nvml.DEC_UTILIZATION_SAMPLES]
    dec[:] = [(t, 40.0 if t > 14e6 else v) for t, v in dec]  # decoding from 14 s on
    idle_until = 13  # what GPM saw: nothing through 13 s
    got = [sample(nvdec_idle=k + 1 <= idle_until) for k in range(21)]
    # The first sample (no value yet), then every sample once GPM sees work.
    assert _seconds(drv.asked[nvml.DEC_UTILIZATION_SAMPLES]) == [1, *range(14, 22)]
    assert [g[(DECODER_UTILIZATION.name, ())] for g in got[12:15]] == [0.0, 0.0, 0.4]
    assert _seconds(drv.reads[nvml.DEC_UTILIZATION_SAMPLES]) == [1, 11, 21]
    assert got[-1][(DECODER_BUSY.name, ())] == pytest.approx(0.4 * 7)


def test_a_failed_buffer_read_is_retried_next_sample_and_counts_nothing_twice() -> None:
    drv, sample = _video_world()
    drv.sessions = 1
    enc = drv.buffers[nvml.ENC_UTILIZATION_SAMPLES]
    enc[:] = [(t, 50.0) for t, _ in enc]
    real = drv.samples
    failures = iter([False, True])  # the first read works, the second (at 11 s) fails

    def flaky(handle: Any, sample_type: int, since_us: int) -> list[tuple[int, float]]:
        if sample_type == nvml.ENC_UTILIZATION_SAMPLES and next(failures, False):
            raise NvmlError(nvml.UNKNOWN)
        return real(handle, sample_type, since_us)

    drv.samples = flaky  # type: ignore[method-assign]
    start = sample()[(ENCODER_BUSY.name, ())]  # at 1 s: the count starts here
    for _ in range(BUFFER_READ_EVERY - 1):
        sample()
    failed = sample()  # at 11 s: the read fails
    assert failed[(ENCODER_BUSY.name, ())] == start
    retried = sample()  # at 12 s: read again, from where the last good read stopped
    assert retried[(ENCODER_BUSY.name, ())] - start == pytest.approx(0.5 * 11.0)


def test_energy_falls_back_to_its_call_only_where_the_field_is_unsupported() -> None:
    drv = PowerFieldDriver()
    drv.fields = {nvml.FI_POWER_AVERAGE: 300_000, nvml.FI_POWER_CURRENT_LIMIT: 700_000}
    dev, clock = _clocked(drv)
    collector = PowerCollector()
    energy = []
    for _ in range(12):
        dev.fetch_fields(collector.fields(dev), SLOW, SLOW_FIELDS)
        out = Emitter()
        collector.collect(dev, out, SampleContext())
        energy += [v for spec, _, v in out.samples if spec.name == "nvml_energy_joules_total"]
        clock.advance(1.0)
    # Unsupported as a field: the call, as seldom as the field would have been read.
    assert energy == [9.0] * 12
    assert drv.calls["total_energy"] == 2


def test_energy_without_a_value_this_sample_is_not_read_another_way() -> None:
    drv = PowerFieldDriver()
    dev, _ = _clocked(drv)

    def answer(handle: Any, requests: Any) -> list[tuple[int, float | None]]:
        return [(nvml.NO_DATA, None) for _ in requests]

    drv.field_values = answer  # type: ignore[method-assign]
    collector = PowerCollector()
    dev.fetch_fields(collector.fields(dev), SLOW, SLOW_FIELDS)
    collector.collect(dev, Emitter(), SampleContext())
    assert drv.calls.get("total_energy", 0) == 0


@pytest.mark.parametrize(("code", "throughput_calls"), [(nvml.NOT_SUPPORTED, 2), (nvml.NO_DATA, 0)])
def test_pcie_throughput_only_where_the_byte_counters_are_unsupported(
    code: int, throughput_calls: int
) -> None:
    drv = PowerFieldDriver()
    dev = device(drv)

    def answer(handle: Any, requests: Any) -> list[tuple[int, float | None]]:
        return [(code, None) for _ in requests]

    drv.field_values = answer  # type: ignore[method-assign]
    collector = PcieCollector()
    dev.fetch_fields(collector.fields(dev), SLOW, SLOW_FIELDS)
    collector.collect(dev, Emitter(), SampleContext())
    assert drv.calls.get("pcie_throughput", 0) == throughput_calls
