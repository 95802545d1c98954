"""GPM profiling metrics: through the stand-in's GPM functions, and on the simulated fleet."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nvml_stub
import pytest
from conftest import Scrape, start_exporter
from fakes import FakeClock
from prometheus_client.parser import text_string_to_metric_families

from exporter import nvml
from exporter.collectors.base import Emitter
from exporter.collectors.gpm import _METRICS, FORGET_AFTER, GpmCollector
from exporter.collectors.shared import SampleContext
from exporter.config import Config, SimulationConfig
from exporter.nvml import DEC_UTILIZATION_SAMPLES
from exporter.sampler import Sampler
from exporter.simulate.driver import SimulatedDriver
from exporter.snapshot import Format

# metric id -> (exported name, extra labels, scale)
BY_ID = {mid: (spec.name, extra, scale) for mid, spec, extra, scale in _METRICS}
EXTRA_LABELS = {spec.name: spec.labels[3:] for _, spec, _, _ in _METRICS}
GRAPHICS_UTIL = 1  # NVML_GPM_METRIC_GRAPHICS_UTIL
SLOW_WINDOW = 10  # samples


def gpm_series(scrape: Scrape) -> dict[tuple[str, str, str, tuple[str, ...]], float]:
    """(gpu, gpu_instance, metric name, extra label values) -> value."""
    out = {}
    for name in {n for n, _, _ in BY_ID.values()}:
        for labels_set, value in scrape.values(name).items():
            labels = dict(labels_set)
            extra = tuple(labels[k] for k in EXTRA_LABELS[name])
            out[(labels["gpu"], labels["gpu_instance"], name, extra)] = value
    return out


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[nvml_stub.Fleet]:
    with nvml_stub.Fleet(tmp_path, num_devices=3) as stub:
        yield stub


@pytest.mark.slow
def test_exported_gpm_values_equal_the_stand_in_per_gpu_and_per_mig_instance(
    fleet: nvml_stub.Fleet,
) -> None:
    fleet.devices[2].enable_mig(2)
    fleet.apply()
    proc = start_exporter(["--sampling.interval", "200ms"], env=fleet.env())
    try:
        proc.wait_for(lambda: any(k[1] for k in gpm_series(proc.get())))
        found = gpm_series(proc.get())
        expected = {}
        for dev in fleet.devices:
            for metric_id, value in dev.gpm_metrics.items():
                name, extra, scale = BY_ID[metric_id]
                expected[(str(dev.index), "", name, extra)] = value * scale
            for mig in dev.mig_devices:
                for metric_id, value in mig.gpm_metrics.items():
                    name, extra, scale = BY_ID[metric_id]
                    key = (str(dev.index), str(mig.gpu_instance_id), name, extra)
                    expected[key] = value * scale
        assert set(found) == set(expected)  # a metric the chip lacks is absent, not zero
        for key, value in expected.items():
            assert found[key] == pytest.approx(value), key
        mig_uuids = {
            dict(k)["mig_uuid"]
            for k in proc.get().values("nvml_gpm_sm_activity_ratio")
            if dict(k)["gpu_instance"]
        }
        assert mig_uuids == {m.uuid for m in fleet.devices[2].mig_devices}
    finally:
        assert proc.stop() == 0
    # Every sample allocated was freed on the way out.
    assert fleet.gpm_samples_outstanding() == 0


@pytest.mark.slow
def test_a_gpu_without_gpm_exports_none_and_stays_quiet(tmp_path: Path) -> None:
    ampere = nvml_stub.ARCH_HOPPER - 2
    with nvml_stub.Fleet(tmp_path, num_devices=2, architecture=ampere) as fleet:
        proc = start_exporter(["--sampling.interval", "200ms"], env=fleet.env())
        try:
            proc.wait_for(lambda: len(proc.get().values("nvml_power_watts")) == 2)
            scrape = proc.get()
            assert gpm_series(scrape) == {}
            assert scrape.values("nvml_collector_success")[frozenset({("collector", "gpm")})] == 1
            calls = fleet.calls()
            assert calls["nvmlGpmQueryDeviceSupport"] == 2  # asked once per GPU, then remembered
            assert calls.get("nvmlGpmSampleAlloc", 0) == 0
            # (The stand-in's PIDs are not on this host; that warning is about processes.)
            noisy = [line for line in proc.log_lines if "level=warn" in line or "Gpm" in line]
            assert [line for line in noisy if "process IDs" not in line] == []
        finally:
            proc.stop()


def test_simulated_gpm_is_consistent_with_utilization() -> None:
    config = dataclasses.replace(
        Config(backend="simulated"), simulation=SimulationConfig(devices=4, mig_devices=1)
    )
    clock = FakeClock()
    sampler = Sampler(config, SimulatedDriver(config.simulation, clock=clock), clock=clock)
    sampler.sample_once()
    for _ in range(20):
        clock.advance(15)
        text = sampler.sample_once().body(Format.TEXT, False).decode()
        values: dict[tuple[str, str], dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("nvml_gpm_"):
                continue
            for s in family.samples:
                key = (s.labels["gpu"], s.labels["gpu_instance"])
                metric = s.name + s.labels.get("pipe", "")
                values.setdefault(key, {})[metric] = s.value
        assert len(values) == 4 + 7
        for key, v in values.items():
            sm = v["nvml_gpm_sm_activity_ratio"]
            assert 0 <= v["nvml_gpm_tensor_activity_ratioany"] <= sm <= 1, key
            assert v["nvml_gpm_tensor_activity_ratiohmma"] <= v["nvml_gpm_tensor_activity_ratioany"]
            assert 0 <= v["nvml_gpm_dram_bandwidth_ratio"] <= 1, key
            assert 0 <= v["nvml_gpm_sm_occupancy_ratio"] <= sm, key
            assert sm <= v["nvml_gpm_graphics_activity_ratio"] <= 1, key


def _decoder_reads(model: str, gpm: bool, samples: int) -> tuple[list[int], list[int], list[str]]:
    """Runs the simulated fleet (2 GPUs) for `samples` one-second samples; returns, per GPU,
    how often its decoder's value was asked for and its buffer read, and the decoder series of
    the last sample."""
    config = dataclasses.replace(
        Config(backend="simulated"),
        simulation=SimulationConfig(devices=2, model=model),
        collectors={"gpm": gpm},
    )
    clock = FakeClock()
    driver = SimulatedDriver(config.simulation, clock=clock)
    asked, reads = [0, 0], [0, 0]
    real_samples, real_instant = driver.samples, driver.decoder_utilization

    def counting_samples(handle: int, sample_type: int, since_us: int) -> list[tuple[int, float]]:
        if sample_type == DEC_UTILIZATION_SAMPLES:
            reads[handle] += 1
        return real_samples(handle, sample_type, since_us)

    def counting_instant(handle: int) -> int:
        asked[handle] += 1
        return real_instant(handle)

    driver.samples = counting_samples  # type: ignore[method-assign]
    driver.decoder_utilization = counting_instant  # type: ignore[method-assign]
    sampler = Sampler(config, driver, clock=clock)
    for _ in range(samples):
        clock.advance(1)
        text = sampler.sample_once().body(Format.TEXT, False).decode()
    decoder = [
        line
        for line in text.splitlines()
        if line.startswith(("nvml_decoder_utilization_ratio", "nvml_decoder_busy_seconds"))
    ]
    return asked, reads, decoder


def test_decoder_value_is_not_asked_for_while_gpm_sees_the_decoders_idle() -> None:
    # The simulated H200's seven NVDEC engines idle under LLM inference, as GPM measures.
    asked, reads, decoder = _decoder_reads("NVIDIA H200", gpm=True, samples=25)
    assert asked == [1, 1]  # the first sample, before GPM has an interval to tell
    # The buffer, for the counter, as every engine's: samples 0, 10 and 20.
    assert reads == [3, 3]
    assert len(decoder) == 4 and all(line.endswith(" 0") for line in decoder)


@pytest.mark.parametrize(
    ("model", "gpm"), [("NVIDIA H200", False), ("NVIDIA A100-SXM4-80GB", True)]
)
def test_decoder_value_is_asked_for_every_sample_where_gpm_cannot_tell(
    model: str, gpm: bool
) -> None:
    # The gpm collector off, or a GPU before Hopper, without GPM.
    asked, reads, decoder = _decoder_reads(model, gpm=gpm, samples=25)
    assert asked == [25, 25]
    assert reads == [3, 3]
    assert len(decoder) == 4 and all(line.endswith(" 0") for line in decoder)


@pytest.mark.slow
def test_stand_in_decoders_idle_by_gpm_and_an_idle_encoder_are_not_asked(
    tmp_path: Path,
) -> None:
    with nvml_stub.Fleet(tmp_path, num_devices=2) as fleet:
        # GPU 0 decodes nothing (its NVDEC engines at 0 in GPM); GPU 1 decodes at 2 %.
        assert fleet.devices[0].gpm_metrics[nvml_stub.GPM_NVDEC_0_UTIL] == 0
        assert fleet.devices[1].gpm_metrics[nvml_stub.GPM_NVDEC_0_UTIL] == 2
        fleet.devices[1].decoder_utilization = 2
        fleet.apply()
        proc = start_exporter(["--sampling.interval", "200ms"], env=fleet.env())
        try:
            time.sleep(2.5)
            scrape = proc.get()
        finally:
            assert proc.stop() == 0
        calls = fleet.calls()
    samples = calls["nvmlDeviceGetMemoryInfo_v2"] // 2
    assert samples >= 10
    ratios = {dict(k)["gpu"]: v for k, v in scrape.values("nvml_decoder_utilization_ratio").items()}
    assert ratios == {"0": 0.0, "1": 0.02}
    # GPU 1's decoder every sample, GPU 0's and both idle encoders' at the first only.
    assert calls["nvmlDeviceGetDecoderUtilization"] == samples + 1
    assert calls["nvmlDeviceGetEncoderUtilization"] == 2
    assert calls["nvmlDeviceGetUtilizationRates"] == 2 * samples
    # Every buffer (GPU, memory, encoder, decoder, on each GPU) at the first sample and every
    # tenth after; each buffer's size is asked once.
    assert calls["nvmlDeviceGetSamples"] == 8 * ((samples + 9) // 10) + 8


def test_graphics_activity_is_computed_over_ten_second_windows_and_held_between() -> None:
    config = dataclasses.replace(
        Config(backend="simulated"), simulation=SimulationConfig(devices=1, seed=3)
    )
    clock = FakeClock()
    driver = SimulatedDriver(config.simulation, clock=clock)
    asked: list[list[int]] = []
    real = driver.gpm_metrics

    def counting(first: object, second: object, ids: list[int]) -> list[tuple[int, float | None]]:
        asked.append(list(ids))
        return real(first, second, ids)

    driver.gpm_metrics = counting  # type: ignore[method-assign,assignment]
    sampler = Sampler(config, driver, clock=clock)
    graphics, sm = [], []
    for _ in range(25):
        clock.advance(1)
        families = {f.name: f for f in sampler.sample_once().families}
        series = families.get("nvml_gpm_graphics_activity_ratio")
        graphics.append(series.lines[0] if series else None)
        sm.append(families.get("nvml_gpm_sm_activity_ratio"))
    slow = [i for i, ids in enumerate(asked) if ids == [GRAPHICS_UTIL]]
    # The first window closes with the first pair, so the metric is there from the second
    # sample on; then every tenth interval.
    assert len(slow) == 3 and len(asked) == 3 + 24
    assert all(GRAPHICS_UTIL not in ids for ids in asked if ids != [GRAPHICS_UTIL])
    assert graphics[0] is None and all(line is not None for line in graphics[1:])
    assert len(set(graphics[2:11])) == 1 and graphics[11] != graphics[10]
    assert sm[0] is None and all(f is not None for f in sm[1:])


def test_gpm_samples_rotate_without_refilling_one_still_needed_and_recover_from_a_failure() -> None:
    config = dataclasses.replace(
        Config(backend="simulated"), simulation=SimulationConfig(devices=1, seed=5)
    )
    clock = FakeClock()
    driver = SimulatedDriver(config.simulation, clock=clock)
    filled: dict[int, int] = {}  # id of a sample buffer -> the sample that last filled it
    pairs: list[tuple[int, int, int, bool]] = []  # (sample, first's fill, second's fill, slow)
    now = [0]
    real_get, real_metrics = driver.gpm_sample_get, driver.gpm_metrics

    def sample_get(handle: object, sample: object) -> bool:
        if now[0] == 15:
            raise nvml.NvmlError(nvml.UNKNOWN)
        filled[id(sample)] = now[0]
        return real_get(handle, sample)

    def metrics(first: object, second: object, ids: list[int]) -> list[tuple[int, float | None]]:
        pairs.append((now[0], filled[id(first)], filled[id(second)], ids == [GRAPHICS_UTIL]))
        return real_metrics(first, second, ids)

    driver.gpm_sample_get = sample_get  # type: ignore[method-assign]
    driver.gpm_metrics = metrics  # type: ignore[method-assign,assignment]
    sampler = Sampler(config, driver, clock=clock)
    present = []
    for index in range(30):
        now[0] = index
        clock.advance(1)
        names = {f.name for f in sampler.sample_once().families}
        present.append("nvml_gpm_sm_activity_ratio" in names)
    for sample, first, second, slow in pairs:
        assert second == sample  # the new sample, just taken
        assert 1 <= sample - first <= (SLOW_WINDOW if slow else 1)
    # The failed sample and the one after it (a pair needs two good samples) have no GPM.
    assert present == [False] + [True] * 14 + [False, False] + [True] * 13


def test_samples_of_a_gpu_whose_read_hangs_are_not_freed_under_it() -> None:
    config = dataclasses.replace(
        Config(backend="simulated"), simulation=SimulationConfig(devices=1, seed=5)
    )
    clock = FakeClock()
    driver = SimulatedDriver(config.simulation, clock=clock)
    sampler = Sampler(config, driver, clock=clock)
    for _ in range(2):
        clock.advance(1)
        sampler.sample_once()
    gpm = next(c for c in sampler._collectors if isinstance(c, GpmCollector))
    device = sampler.session.devices[0]
    freed: list[object] = []
    entered, release = threading.Event(), threading.Event()
    real_get = driver.gpm_sample_get

    def hanging_get(handle: object, sample: object) -> bool:
        entered.set()
        release.wait(10)
        return real_get(handle, sample)

    driver.gpm_sample_get = hanging_get  # type: ignore[method-assign]
    driver.gpm_sample_free = freed.append  # type: ignore[method-assign,assignment]
    reader = threading.Thread(target=gpm.collect, args=(device, Emitter(), SampleContext()))
    reader.start()
    assert entered.wait(10)
    for _ in range(FORGET_AFTER + 2):  # the GPU is not seen while its read hangs
        gpm.collect_global(Emitter())
    gpm.close()  # shutting down meanwhile leaves them to the process's exit
    assert freed == []
    release.set()
    reader.join(10)
    for _ in range(FORGET_AFTER + 1):
        gpm.collect_global(Emitter())
    assert len(freed) == 3
