"""A kubelet stand-in for tests: a protobuf encoder for pod-resources replies, and a real gRPC
server on a unix socket serving them (fixtures `sockdir` and `kubelet`, via conftest).

The encoder is written independently of exporter.podresources' decoder, so the two check
each other.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc  # a test dependency: the Kubernetes support is tested, not skipped
import pytest

from exporter.podresources import LIST_METHOD

# --- a protobuf encoder, just enough for ListPodResourcesResponse and unknown fields ---------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes | str) -> bytes:
    raw = payload.encode() if isinstance(payload, str) else payload
    return key(number, 2) + varint(len(raw)) + raw


def devices(resource: str, *ids: str, extra: bytes = b"") -> bytes:
    return ld(1, resource) + b"".join(ld(2, i) for i in ids) + extra


def container(name: str, *devs: bytes, extra: bytes = b"") -> bytes:
    return ld(1, name) + b"".join(ld(2, d) for d in devs) + extra


def pod(namespace: str, name: str, *containers: bytes) -> bytes:
    return ld(1, name) + ld(2, namespace) + b"".join(ld(3, c) for c in containers)


def response(*pods: bytes) -> bytes:
    return b"".join(ld(1, p) for p in pods)


# Fields a current kubelet sends that the decoder must pass over (api.proto numbers).
TOPOLOGY = ld(3, ld(1, key(1, 0) + varint(1)))  # ContainerDevices.topology.nodes[0].ID = 1
CPU_IDS = ld(3, varint(2) + varint(3))  # ContainerResources.cpu_ids, packed
MEMORY = ld(4, ld(1, "memory") + key(2, 0) + varint(1 << 33))  # ContainerResources.memory
DRA = ld(5, ld(2, "claim") + ld(3, "ns"))  # ContainerResources.dynamic_resources


def group(number: int, body: bytes) -> bytes:
    return key(number, 3) + body + key(number, 4)


# --- a kubelet stand-in: a real gRPC server on a unix socket ---------------------------------


@dataclass
class FakeKubelet:
    socket_path: str
    grpc: ModuleType
    reply: bytes = b""
    abort: Any = None  # a grpc.StatusCode to fail with
    slow: bool = False
    calls: list[tuple[str, bytes]] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths must fit in 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="podres-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serving_kubelet(socket_path: str) -> Iterator[FakeKubelet]:
    """A kubelet stand-in answering on `socket_path` while the block runs."""
    fake = FakeKubelet(socket_path, grpc)

    def serve(method: str) -> Any:
        def handle(request: bytes, context: Any) -> bytes:
            fake.calls.append((method, request))
            fake.entered.set()
            if fake.slow:
                fake.release.wait(10)
            if fake.abort is not None:
                context.abort(fake.abort, "injected failure")
            return fake.reply

        return grpc.unary_unary_rpc_method_handler(handle)

    service, _, method = LIST_METHOD.lstrip("/").partition("/")
    handler = grpc.method_handlers_generic_handler(service, {method: serve(LIST_METHOD)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix://{fake.socket_path}")
    server.start()
    try:
        yield fake
    finally:
        fake.release.set()
        server.stop(grace=None).wait(5)


@pytest.fixture
def kubelet(sockdir: Path) -> Iterator[FakeKubelet]:
    with serving_kubelet(str(sockdir / "kubelet.sock")) as fake:
        yield fake
