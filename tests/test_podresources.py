"""The kubelet pod-resources client: wire decoding, and polling a real gRPC server on a unix socket.

Responses are built with the small encoder below, written independently of the module's decoder
so that the two check each other.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubelet_stub import (
    CPU_IDS,
    DRA,
    MEMORY,
    TOPOLOGY,
    FakeKubelet,
    container,
    devices,
    group,
    key,
    ld,
    pod,
    response,
    varint,
)

from exporter import podresources
from exporter.podresources import (
    LIST_METHOD,
    PodAssignment,
    PodResourcesWatcher,
    decode_list_response,
    device_key,
)

REPO = Path(__file__).resolve().parent.parent

# Every other wire type, as a future field might use: varint, fixed64, fixed32, nested groups
# (whose length-delimited contents belong to the group, not to the enclosing message).
ODD_FIELDS = (
    key(20, 0)
    + varint(2**64 - 1)
    + key(21, 1)
    + bytes(8)
    + key(22, 5)
    + bytes(4)
    + group(23, ld(1, "not a pod") + group(24, key(25, 0) + varint(7)))
)

GPU0 = "GPU-0b0f3b5a-0000-0000-0000-000000000000"
GPU1 = "GPU-1c1f3b5a-1111-1111-1111-111111111111"
SHARED = "GPU-2d2f3b5a-2222-2222-2222-222222222222"
MIG_A = "MIG-3e3f3b5a-3333-3333-3333-333333333333"
MIG_B = "MIG-4f4f3b5a-4444-4444-4444-444444444444"

NODE = (
    response(
        pod(
            "ml",
            "trainer-0",
            container(
                "main",
                devices(
                    "nvidia.com/gpu", GPU0, GPU1, extra=TOPOLOGY + group(9, ld(2, "GPU-bogus"))
                ),
                extra=CPU_IDS + ODD_FIELDS,
            ),
            container("sidecar", devices("example.com/fpga", "fpga-7")),
        ),
        pod(
            "ml",
            "notebook",
            container("lab", devices("nvidia.com/mig-1g.18gb", MIG_A), extra=MEMORY + DRA),
            container("tools", devices("nvidia.com/mig-1g.18gb", MIG_B)),
        ),
        pod("web", "infer-a", container("srv", devices("nvidia.com/gpu", f"{SHARED}::0"))),
        # Two replicas of one time-sliced GPU in one container: still one holder.
        pod(
            "web",
            "infer-b",
            container("srv", devices("nvidia.com/gpu", f"{SHARED}::1 ", f"{SHARED}::2")),
        ),
        pod("kube-system", "dns", container("coredns")),
    )
    + ODD_FIELDS
)

EXPECTED = {
    GPU0: (PodAssignment("ml", "trainer-0", "main", "nvidia.com/gpu"),),
    GPU1: (PodAssignment("ml", "trainer-0", "main", "nvidia.com/gpu"),),
    MIG_A: (PodAssignment("ml", "notebook", "lab", "nvidia.com/mig-1g.18gb"),),
    MIG_B: (PodAssignment("ml", "notebook", "tools", "nvidia.com/mig-1g.18gb"),),
    SHARED: (
        PodAssignment("web", "infer-a", "srv", "nvidia.com/gpu"),
        PodAssignment("web", "infer-b", "srv", "nvidia.com/gpu"),
    ),
}

# --- decoder --------------------------------------------------------------------------------


def test_decode_rows_skipping_unknown_fields() -> None:
    assert decode_list_response(NODE) == [
        ("ml", "trainer-0", "main", "nvidia.com/gpu", GPU0),
        ("ml", "trainer-0", "main", "nvidia.com/gpu", GPU1),
        ("ml", "trainer-0", "sidecar", "example.com/fpga", "fpga-7"),
        ("ml", "notebook", "lab", "nvidia.com/mig-1g.18gb", MIG_A),
        ("ml", "notebook", "tools", "nvidia.com/mig-1g.18gb", MIG_B),
        ("web", "infer-a", "srv", "nvidia.com/gpu", f"{SHARED}::0"),
        ("web", "infer-b", "srv", "nvidia.com/gpu", f"{SHARED}::1 "),
        ("web", "infer-b", "srv", "nvidia.com/gpu", f"{SHARED}::2"),
    ]


def test_decode_fields_in_any_order() -> None:
    dev = ld(2, GPU0) + ld(1, "nvidia.com/gpu")
    ctr = ld(2, dev) + ld(1, "c")
    data = ld(1, ld(3, ctr) + ld(2, "ns") + ld(1, "p"))
    assert decode_list_response(data) == [("ns", "p", "c", "nvidia.com/gpu", GPU0)]


def test_decode_known_number_with_other_wire_type_is_skipped() -> None:
    ctr = ld(1, "c") + ld(2, devices("nvidia.com/gpu", GPU0))
    data = ld(1, key(1, 0) + varint(5) + ld(2, "ns") + ld(3, ctr))
    assert decode_list_response(data) == [("ns", "", "c", "nvidia.com/gpu", GPU0)]
    assert decode_list_response(b"") == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x0a", id="length missing"),
        pytest.param(b"\x0a\x05abc", id="payload short"),
        pytest.param(b"\x0a\x85", id="length varint cut"),
        pytest.param(b"\x08", id="varint value missing"),
        pytest.param(b"\x09" + bytes(7), id="fixed64 short"),
        pytest.param(b"\x0d" + bytes(3), id="fixed32 short"),
        pytest.param(ld(1, b"\x0a\x05ab"), id="nested name short"),
        pytest.param(key(23, 3) + key(1, 0) + varint(1), id="group not ended"),
        pytest.param(key(23, 4), id="group end without start"),
        pytest.param(key(23, 3) + key(24, 4), id="group ends mismatched"),
        pytest.param(key(1, 6) + b"x", id="wire type 6"),
        pytest.param(key(1, 7), id="wire type 7"),
        pytest.param(b"\x02\x00", id="field number 0"),
        pytest.param(key(9, 0) + b"\xff" * 10 + b"\x01", id="varint over 10 bytes"),
        pytest.param(ld(1, ld(1, b"\xff\xfe")), id="name not utf-8"),
    ],
)
def test_decode_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_list_response(data)


def test_decode_rejects_every_truncation() -> None:
    # One top-level field: any proper prefix ends inside it.
    whole = response(pod("ml", "trainer-0", container("main", devices("nvidia.com/gpu", GPU0))))
    for cut in range(1, len(whole)):
        with pytest.raises(ValueError):
            decode_list_response(whole[:cut])


@pytest.mark.parametrize(
    ("device_id", "expected"),
    [
        (GPU0, GPU0),
        (f"{GPU0}::3", GPU0),
        (f"  {GPU0}::12\n", GPU0),
        (f" {MIG_A} ", MIG_A),
        ("  ", ""),
    ],
)
def test_device_key(device_id: str, expected: str) -> None:
    assert device_key(device_id) == expected


def watcher_for(fake: FakeKubelet, **kwargs: Any) -> PodResourcesWatcher:
    return PodResourcesWatcher(socket_path=fake.socket_path, **kwargs)


def test_assignments_from_a_real_server(kubelet: FakeKubelet) -> None:
    kubelet.reply = NODE
    watcher = watcher_for(kubelet)
    before = time.time()

    watcher.refresh_once()

    assert kubelet.calls == [(LIST_METHOD, b"")]
    assert watcher.up
    assert watcher.last_error == ""
    assert watcher.errors == 0
    assert watcher.last_success is not None
    assert watcher.last_success >= before
    got = watcher.assignments()
    assert dict(got) == EXPECTED
    with pytest.raises(TypeError):
        got[GPU0] = ()  # type: ignore[index]


def test_resource_prefixes_choose_what_is_kept(kubelet: FakeKubelet) -> None:
    kubelet.reply = NODE
    watcher = watcher_for(kubelet, resource_prefixes=("nvidia.com/mig-", "example.com/"))
    watcher.refresh_once()
    assert set(watcher.assignments()) == {MIG_A, MIG_B, "fpga-7"}


def test_slow_kubelet_times_out(kubelet: FakeKubelet) -> None:
    kubelet.reply = NODE
    kubelet.slow = True
    watcher = watcher_for(kubelet, timeout=0.3)

    start = time.monotonic()
    watcher.refresh_once()
    elapsed = time.monotonic() - start

    assert 0.25 < elapsed < 1.5
    assert not watcher.up
    assert watcher.last_error == "timeout"
    assert watcher.errors == 1
    assert watcher.assignments() == {}


def test_socket_missing(sockdir: Path) -> None:
    watcher = PodResourcesWatcher(socket_path=str(sockdir / "absent.sock"))
    watcher.refresh_once()
    assert not watcher.up
    assert watcher.last_error == "socket missing"
    assert watcher.errors == 1
    assert watcher.last_success is None
    assert watcher.assignments() == {}


def test_not_a_socket(sockdir: Path) -> None:
    path = sockdir / "plain-file"
    path.write_text("")
    watcher = PodResourcesWatcher(socket_path=str(path))
    watcher.refresh_once()
    assert (watcher.up, watcher.last_error) == (False, "not a socket")


def test_connection_refused(sockdir: Path) -> None:
    path = sockdir / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound but never listening, like a kubelet that just died
        watcher = PodResourcesWatcher(socket_path=str(path), timeout=1.0)
        watcher.refresh_once()
    assert (watcher.up, watcher.last_error) == (False, "connection refused")


def test_grpcio_missing(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import grpc` fail just as it would were grpcio not installed.
    monkeypatch.setitem(sys.modules, "grpc", None)
    watcher = PodResourcesWatcher(socket_path=str(sockdir / "kubelet.sock"))
    watcher.refresh_once()
    watcher.refresh_once()
    assert (watcher.up, watcher.last_error, watcher.errors) == (False, "grpcio not installed", 2)
    assert watcher.assignments() == {}


def test_importing_the_module_does_not_import_grpc() -> None:
    code = "import sys, exporter.podresources; sys.exit('grpc' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=30)


def test_server_errors_are_named(kubelet: FakeKubelet) -> None:
    kubelet.abort = kubelet.grpc.StatusCode.UNIMPLEMENTED
    watcher = watcher_for(kubelet)
    watcher.refresh_once()
    assert (watcher.up, watcher.last_error) == (False, "unimplemented")


def test_unexpected_error_is_a_failed_poll(
    kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(data: bytes) -> list[tuple[str, str, str, str, str]]:
        raise RuntimeError("bug")

    monkeypatch.setattr(podresources, "decode_list_response", broken)
    watcher = watcher_for(kubelet)
    watcher.refresh_once()
    assert (watcher.up, watcher.last_error) == (False, "unexpected error")
    assert [r.exc_info is not None for r in caplog.records] == [True]


def test_failure_keeps_recent_assignments(kubelet: FakeKubelet) -> None:
    kubelet.reply = NODE
    watcher = watcher_for(kubelet)
    watcher.refresh_once()
    good = watcher.last_success

    kubelet.reply = NODE[:-1]
    watcher.refresh_once()

    assert not watcher.up
    assert watcher.last_error == "malformed response"
    assert watcher.errors == 1
    assert watcher.last_success == good
    assert dict(watcher.assignments()) == EXPECTED


def test_old_assignments_are_dropped(kubelet: FakeKubelet) -> None:
    kubelet.reply = NODE
    # Stale after 3 intervals plus one timeout: 0.08 s.
    watcher = watcher_for(kubelet, interval=0.02, timeout=0.02)
    watcher.refresh_once()
    kubelet.abort = kubelet.grpc.StatusCode.UNAVAILABLE
    watcher.refresh_once()
    time.sleep(0.15)
    assert not watcher.up
    assert watcher.last_success is not None
    assert watcher.assignments() == {}


def test_each_failure_reason_logged_once(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.podresources")
    watcher = watcher_for(kubelet)

    def poll(times: int) -> list[tuple[int, str]]:
        caplog.clear()
        for _ in range(times):
            watcher.refresh_once()
        return [(r.levelno, getattr(r, "reason", "")) for r in caplog.records]

    kubelet.abort = kubelet.grpc.StatusCode.UNAVAILABLE
    assert poll(3) == [(logging.WARNING, "kubelet unavailable")]
    kubelet.abort, kubelet.reply = None, b"\x0a"
    assert poll(2) == [(logging.WARNING, "malformed response")]
    kubelet.abort = kubelet.grpc.StatusCode.UNAVAILABLE
    assert poll(2) == []
    kubelet.abort, kubelet.reply = None, NODE
    assert poll(2) == [(logging.INFO, "")]
    kubelet.abort = kubelet.grpc.StatusCode.UNAVAILABLE
    assert poll(1) == [(logging.WARNING, "kubelet unavailable")]
    assert watcher.errors == 8


def test_background_polling(kubelet: FakeKubelet) -> None:
    kubelet.reply = NODE
    watcher = watcher_for(kubelet, interval=0.05)
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while len(kubelet.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.up
        assert dict(watcher.assignments()) == EXPECTED
    finally:
        watcher.stop()
    calls = len(kubelet.calls)
    time.sleep(0.15)
    assert len(kubelet.calls) == calls


def test_readers_do_not_wait_for_a_slow_kubelet(kubelet: FakeKubelet) -> None:
    kubelet.reply = NODE
    watcher = watcher_for(kubelet, timeout=5.0)
    watcher.refresh_once()
    kubelet.slow = True
    kubelet.entered.clear()
    watcher.start()
    try:
        assert kubelet.entered.wait(5)
        start = time.monotonic()
        got = (dict(watcher.assignments()), watcher.up, watcher.errors, watcher.last_error)
        assert time.monotonic() - start < 0.1
        assert got == (EXPECTED, True, 0, "")
    finally:
        kubelet.release.set()
        watcher.stop()


def test_interval_and_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PodResourcesWatcher(interval=0)
    with pytest.raises(ValueError):
        PodResourcesWatcher(timeout=-1)
