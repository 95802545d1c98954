"""The real-GPU tool's comparison with nvidia-smi, on the files of a run on an H200."""

from __future__ import annotations

from pathlib import Path

from benchmarks import realgpu

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "h200-run"


def test_every_quantity_agrees_with_nvidia_smi_on_the_recorded_h200_run() -> None:
    table = realgpu.compare(RUN).splitlines()[2:]
    assert len(table) == 2 * len(realgpu._COMPARED)
    assert all(row.endswith("| yes |") for row in table), "\n".join(table)


def test_a_value_off_by_more_than_its_tolerance_disagrees(tmp_path: Path) -> None:
    (tmp_path / "smi-idle.xml").write_text((RUN / "smi-idle.xml").read_text())
    scrape = (RUN / "scrape-ours-idle.txt").read_text()
    power_limit = next(
        line for line in scrape.splitlines() if line.startswith("nvml_power_limit_watts{")
    )
    scrape = scrape.replace(power_limit, power_limit.rsplit(" ", 1)[0] + " 650.0")
    (tmp_path / "scrape-ours-idle.txt").write_text(scrape)
    rows = [row for row in realgpu.compare(tmp_path).splitlines() if "| power limit |" in row]
    assert rows == ["| idle | power limit | 700 | 650 | **no** |"]


def test_nvidia_smi_units_become_base_units() -> None:
    assert realgpu._smi_value("143771 MiB") == 143771 * 2**20
    assert realgpu._smi_value("1500 MHz") == 1.5e9
    assert realgpu._smi_value("99 %") == 0.99
    assert realgpu._smi_value("16x") == 16
    assert realgpu._smi_value("N/A") is None
