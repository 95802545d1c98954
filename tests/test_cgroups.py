"""Which container and pod a GPU process belongs to, from fake /proc trees of real layouts."""

from __future__ import annotations

import errno
from pathlib import Path, PosixPath
from typing import NamedTuple

import pytest

from exporter.cgroups import (
    ContainerRef,
    parse_cgroup,
    process_name,
    read_container,
)

PROC = Path(__file__).parent / "fixtures" / "proc"
NONE = ContainerRef("", "", "")
ID_A = "a" * 64
ID_B = "b" * 64
UID = "8f2c1a3e-5b4d-4c6e-9a7b-0d1e2f3a4b5c"


class Case(NamedTuple):
    tree: str  # one directory under tests/fixtures/proc, holding <pid>/cgroup and <pid>/comm
    pid: int
    comm: str
    expected: ContainerRef


CASES = [
    Case(
        "docker_cgroupfs_v1",
        4101,
        "python3",
        ContainerRef(
            "d8152e60e177e83a57c570cbd0d54e996af54c017e720a2c0e56ef60039a28ac", "", "docker"
        ),
    ),
    Case(
        "docker_systemd_v1",
        4102,
        "python3",
        ContainerRef(
            "d74ac93073a9ddd0b187da275f54e70f8adedad5cc2dda3e12bb34d7e23a58b3", "", "docker"
        ),
    ),
    Case(
        "docker_systemd_v2",
        4103,
        "ollama",
        ContainerRef(
            "d7ee1e6f03d0d7d6c372bc38a56d7ea0870eaca7e1eb772773789e9bdcd48b17", "", "docker"
        ),
    ),
    Case(
        "k8s_containerd_systemd_burstable_v2",
        5201,
        "python",
        ContainerRef(
            "5fb0d90dc79203238b98becf4cadba1b34ae88ecb9e57610be7177dc20f7961b",
            "e5c6b398-ad93-4d33-a4aa-2981666f020c",
            "containerd",
        ),
    ),
    Case(
        "k8s_containerd_systemd_besteffort_v1",
        5202,
        "python",
        ContainerRef(
            "3f40391282803ff47aa2daac611b218dd5c12efb8abf8bc5e385aef34f8f3e91",
            "43b138c0-7bd2-44ce-abb1-0a558cd3905d",
            "containerd",
        ),
    ),
    Case(
        "k8s_containerd_systemd_guaranteed_v2",
        5203,
        "python",
        ContainerRef(
            "220be11211f83bb22c8eadd43635cf3402f812f27aeef6881465f99e7e373e0b",
            "a0a72cd5-0dac-4de3-a649-ffbfd452dd6b",
            "containerd",
        ),
    ),
    # cgroupfs names the container's cgroup by its bare id: the runtime cannot be told.
    Case(
        "k8s_cgroupfs_burstable_v1",
        6301,
        "trainer",
        ContainerRef(
            "19922025e431984ef1c06c97cd052e5c8c833cc87a7a63c15da5ee30a15ee2e7",
            "0aa9d273-78c2-4aeb-a252-27a762dae413",
            "",
        ),
    ),
    Case(
        "k8s_cgroupfs_besteffort_v2",
        6302,
        "trainer",
        ContainerRef(
            "6086c6b6bd404ca6a3a3339229479a693630c21441f9a6425d55c4ab6c8c35c9",
            "11c775d4-3ae6-4f9a-aafc-ed8c50a5a495",
            "",
        ),
    ),
    Case(
        "k8s_cgroupfs_guaranteed_v1",
        6303,
        "trainer",
        ContainerRef(
            "7c5dd46d6ea0b66d38ee1d5329c15b48af2c21775107e5090d03480ad31f9568",
            "29804999-170f-4190-aff9-39e91480cc7f",
            "",
        ),
    ),
    Case(
        "k8s_crio_burstable_v2",
        71001,
        "vllm",
        ContainerRef(
            "920d6c7566fbd57c99c1a88303d84eced30434e5a26932c0de038a9e4c64fc6c",
            "390d665b-ab5c-445f-a5ed-27b33fdf9d70",
            "cri-o",
        ),
    ),
    # conmon watches the container from a scope of its own; it is in the pod, not the container.
    Case(
        "k8s_crio_conmon_v2",
        71002,
        "conmon",
        ContainerRef("", "751603e0-1d65-41cf-af94-f7c7aae06b9b", ""),
    ),
    Case(
        "k8s_crio_guaranteed_v1",
        71003,
        "tritonserver",
        ContainerRef(
            "351209aaec77999476aa77b8b2d1f390e6e8cd4863f7bd424c85856ee5c5f648",
            "0e18284c-d4f1-4008-a607-23f5cd9f1cc3",
            "cri-o",
        ),
    ),
    Case(
        "podman_machine_v2",
        8101,
        "python3",
        ContainerRef(
            "a35908d2a408af880f72adc0a86318aff085b7bbe4db63c39fe6fee81bb3eee4", "", "podman"
        ),
    ),
    Case(
        "podman_rootless_v2",
        8102,
        "python3",
        ContainerRef(
            "bc16b367646653e925b7f73d69c5b0e9f29554937d28d2db15ccd6a224e3d650", "", "podman"
        ),
    ),
    Case(
        "podman_machine_v1",
        8103,
        "python3",
        ContainerRef(
            "057957fd17405fd2711b1683d7b03e6e0b5e57b60d82a217923aee7579751931", "", "podman"
        ),
    ),
    # A kind node is a Docker container; the pod's container inside it is the one that counts.
    Case(
        "kind_nested_v2",
        9101,
        "python",
        ContainerRef(
            "206131d0676cc1222efc0839f555f193d5a6f9565498fc145ec9a3c97f3b093e",
            "79edf164-8c8e-4073-a0a3-02cf7ffdd4e8",
            "containerd",
        ),
    ),
    # Read from inside a private cgroup namespace, the path starts above the reader's own cgroup.
    Case(
        "cgroupns_relative_v2",
        9102,
        "python",
        ContainerRef(
            "8499b1150431f4531e578af76e917041cb91c4dac615c5592e87edb13b6a97f1",
            "ce1ef16e-d053-41ba-a55f-c2cc45ea2167",
            "containerd",
        ),
    ),
    Case("host_user_session_v2", 2201, "nvidia-smi", NONE),
    Case("host_sshd_v1", 2202, "sshd", NONE),
    Case("host_init_v2", 1, "systemd", NONE),
    Case("empty", 3301, "cuda-app", NONE),
    # Junk, a line with a non-numeric hierarchy naming a decoy id, bytes that are not UTF-8.
    Case(
        "garbage",
        3302,
        "gpu\ufffdburn",
        ContainerRef(
            "6df22dd0046265035c0b5ad9f8cf2fe9fc368efc4e07c4f9af268fa39be0a173", "", "docker"
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.tree for case in CASES])
def test_fixture_tree(case: Case) -> None:
    root = PROC / case.tree
    assert read_container(case.pid, root) == case.expected
    assert process_name(case.pid, root) == case.comm


def test_every_fixture_tree_has_a_case() -> None:
    assert sorted(p.name for p in PROC.iterdir()) == sorted(case.tree for case in CASES)


def test_a_pid_that_is_gone_or_never_visible_is_none() -> None:
    assert read_container(99999, PROC / "docker_systemd_v2") is None
    assert process_name(99999, PROC / "docker_systemd_v2") is None
    assert read_container(4103, PROC / "no-such-proc") is None


def _failing_root(error: OSError) -> Path:
    class FailingPath(PosixPath):
        def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
            raise error

    return FailingPath("/fake-proc")


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "exited after NVML listed it"),
        ProcessLookupError(errno.ESRCH, "exited while being read"),
        PermissionError(errno.EACCES, "hidepid"),
        OSError(errno.EIO, "anything else"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_read_errors_are_none_not_raised(error: OSError) -> None:
    assert read_container(4103, _failing_root(error)) is None
    assert process_name(4103, _failing_root(error)) is None


def test_an_unreadable_cgroup_file_is_none(tmp_path: Path) -> None:
    (tmp_path / "7" / "cgroup").mkdir(parents=True)
    assert read_container(7, tmp_path) is None


def test_v1_takes_the_line_that_carries_the_container() -> None:
    text = (
        "13:rdma:/\n"
        f"12:pids:/kubepods/burstable/pod{UID}\n"
        f"7:memory:/kubepods/burstable/pod{UID}/{ID_A}\n"
        f"1:name=systemd:/kubepods/burstable/pod{UID}/{ID_B}\n"
    )
    assert parse_cgroup(text) == ContainerRef(ID_A, UID, "")


def test_podman_conmon_is_not_the_container() -> None:
    text = f"0::/machine.slice/libpod-conmon-{ID_A}.scope\n"
    assert parse_cgroup(text) == NONE


def test_podman_pods_are_not_kubernetes_pods() -> None:
    text = f"0::/machine.slice/machine-libpod_pod_{ID_B}.slice/libpod-{ID_A}.scope/container\n"
    assert parse_cgroup(text) == ContainerRef(ID_A, "", "podman")


def test_only_a_full_length_bare_id_is_a_container() -> None:
    assert parse_cgroup("0::/system.slice/deadbeef\n") == NONE
    assert parse_cgroup(f"0::/ecs/task/{ID_A}\n") == ContainerRef(ID_A, "", "")


@pytest.mark.parametrize("text", ["", "\n\n", "0::\n", "garbage\n:::\n", "0:/docker\n"])
def test_nothing_to_go_on_is_no_container(text: str) -> None:
    assert parse_cgroup(text) == NONE
