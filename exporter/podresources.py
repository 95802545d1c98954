"""Which Kubernetes pod holds each GPU, from the kubelet's pod-resources API.

The kubelet serves `v1.PodResourcesLister/List` over gRPC on a unix socket. grpcio is an optional
dependency, imported only when a poll runs, so the exporter works without it outside Kubernetes.
The messages are encoded and decoded here, by hand, so that neither protobuf nor generated code is
needed; field numbers follow k8s.io/kubelet/pkg/apis/podresources/v1/api.proto.
"""

from __future__ import annotations

import importlib
import logging
import math
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType, ModuleType

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"

# The kubelet's own pod-resources client accepts replies up to 16 MiB; gRPC's default of 4 MiB
# would make a busy node fail here first.
_MAX_REPLY_BYTES = 16 * 1024 * 1024

# A mapping this many intervals old is dropped even if no newer one came: by then pods may have
# moved, and a GPU labelled with the wrong pod is worse than one with no pod labels.
STALE_INTERVALS = 3

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = range(6)
_MAX_FIELD_NUMBER = (1 << 29) - 1


@dataclass(frozen=True, order=True)
class PodAssignment:
    namespace: str
    pod: str
    container: str
    resource_name: str


Row = tuple[str, str, str, str, str]
Assignments = Mapping[str, tuple[PodAssignment, ...]]

_EMPTY: Assignments = MappingProxyType({})


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def _skip(data: bytes, pos: int, size: int) -> int:
    end = pos + size
    if end > len(data):
        raise ValueError(f"truncated field: {size} bytes wanted, {len(data) - pos} left")
    return end


def _fields(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(number, payload) of each top-level length-delimited field.

    Every other field is validated and skipped, groups included, so that fields a newer kubelet
    adds (CPU ids, memory, topology, DRA claims...) never break decoding. A known number arriving
    with another wire type is skipped too, as protobuf's own parsers treat it as unknown.
    """
    pos = 0
    open_groups: list[int] = []
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if not 1 <= number <= _MAX_FIELD_NUMBER:
            raise ValueError(f"invalid field number {number}")
        if wire == _VARINT:
            _, pos = _varint(data, pos)
        elif wire == _I64:
            pos = _skip(data, pos, 8)
        elif wire == _I32:
            pos = _skip(data, pos, 4)
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            start, pos = pos, _skip(data, pos, size)
            if not open_groups:
                yield number, data[start:pos]
        elif wire == _SGROUP:
            open_groups.append(number)
        elif wire == _EGROUP:
            if not open_groups or open_groups.pop() != number:
                raise ValueError(f"end of group {number} that was not started")
        else:
            raise ValueError(f"invalid wire type {wire}")
    if open_groups:
        raise ValueError(f"group {open_groups[-1]} not ended")


def _text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"string field is not UTF-8: {err.reason}") from None


def _decode_devices(data: bytes) -> tuple[str, list[str]]:
    resource = ""
    ids: list[str] = []
    for number, payload in _fields(data):
        if number == 1:
            resource = _text(payload)
        elif number == 2:
            ids.append(_text(payload))
    return resource, ids


def _decode_container(data: bytes) -> tuple[str, list[tuple[str, list[str]]]]:
    name = ""
    devices: list[tuple[str, list[str]]] = []
    for number, payload in _fields(data):
        if number == 1:
            name = _text(payload)
        elif number == 2:
            devices.append(_decode_devices(payload))
    return name, devices


def _decode_pod(data: bytes) -> list[Row]:
    name = namespace = ""
    containers: list[tuple[str, list[tuple[str, list[str]]]]] = []
    for number, payload in _fields(data):
        if number == 1:
            name = _text(payload)
        elif number == 2:
            namespace = _text(payload)
        elif number == 3:
            containers.append(_decode_container(payload))
    # Fields may come in any order, so rows are built only once the pod's names are known.
    return [
        (namespace, name, container, resource, device_id)
        for container, devices in containers
        for resource, ids in devices
        for device_id in ids
    ]


def decode_list_response(data: bytes) -> list[Row]:
    """(namespace, pod, container, resource_name, device_id) for every allocated device.

    Raises ValueError on input that is not a well-formed ListPodResourcesResponse.
    """
    rows: list[Row] = []
    for number, payload in _fields(data):
        if number == 1:
            rows.extend(_decode_pod(payload))
    return rows


def device_key(device_id: str) -> str:
    """Normalises a device-plugin id to the UUID NVML reports: strips time-slicing / sharing
    replica suffixes such as "GPU-...::3" and surrounding whitespace."""
    uuid, _, _replica = device_id.strip().partition("::")
    return uuid.strip()


def _assign(rows: list[Row], resource_prefixes: tuple[str, ...]) -> Assignments:
    """Device key -> everyone holding it, in a stable order, for the resources kept."""
    holders: dict[str, set[PodAssignment]] = {}
    for namespace, pod, container, resource, device_id in rows:
        key = device_key(device_id)
        if key and resource.startswith(resource_prefixes):
            holders.setdefault(key, set()).add(PodAssignment(namespace, pod, container, resource))
    return MappingProxyType({key: tuple(sorted(who)) for key, who in sorted(holders.items())})


class _PollFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _rpc_reason(code: str, details: str) -> str:
    if code == "DEADLINE_EXCEEDED":
        return "timeout"
    if code == "UNAVAILABLE":
        lowered = details.lower()
        if "no such file" in lowered:
            return "socket missing"
        for symptom in ("connection refused", "permission denied"):
            if symptom in lowered:
                return symptom
        return "kubelet unavailable"
    return code.lower().replace("_", " ")


def _call_list(grpc: ModuleType, target: str, timeout: float) -> bytes:
    # A fresh channel per poll: a long-lived one backs off for up to two minutes after the kubelet
    # restarts, failing every poll meanwhile; at one connection per interval the cost is nil.
    options = [("grpc.max_receive_message_length", _MAX_REPLY_BYTES)]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(LIST_METHOD, request_serializer=None, response_deserializer=None)
        try:
            # An empty ListPodResourcesRequest encodes to no bytes at all.
            reply = call(b"", timeout=timeout)
        except grpc.RpcError as err:
            code = err.code()
            details = str(err.details() or "")
            reason = _rpc_reason(str(getattr(code, "name", code)), details)
            raise _PollFailed(reason, details) from None
    if not isinstance(reply, bytes):
        raise _PollFailed("malformed response", f"reply is {type(reply).__name__}, not bytes")
    return reply


@dataclass(frozen=True)
class _State:
    assignments: Assignments
    up: bool
    last_success: float | None
    fresh_until: float  # time.monotonic() after which `assignments` is too old to serve
    errors: int
    last_error: str


class PodResourcesWatcher:
    """Polls the kubelet in a background daemon thread every `interval` seconds with a per-call
    `timeout`; readers never block on the kubelet.

    When a poll fails, the last good mapping is still served, for up to STALE_INTERVALS intervals
    (plus one timeout) after it was taken: a kubelet restart or one slow reply should not strip
    pod labels from every series for a scrape or two, but a mapping that old may be wrong.
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        interval: float = 10.0,
        timeout: float = 2.0,
        resource_prefixes: tuple[str, ...] = ("nvidia.com/",),
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise ValueError("interval and timeout must be positive")
        self._socket_path = socket_path
        self._target = f"unix://{Path(socket_path).absolute()}"
        self._interval = interval
        self._timeout = timeout
        self._prefixes = resource_prefixes
        self._stale_after = STALE_INTERVALS * interval + timeout
        # Readers only ever load this one reference, which each poll replaces whole.
        self._state = _State(
            assignments=_EMPTY,
            up=False,
            last_success=None,
            fresh_until=-math.inf,
            errors=0,
            last_error="",
        )
        self._poll_lock = threading.Lock()
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="podresources", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        # A poll in flight ends by its deadline, which bounds this wait; should grpc ever overrun
        # it, the thread is a daemon and cannot keep the process alive.
        thread.join(self._timeout + 1.0)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.refresh_once()
            stop.wait(self._interval)

    def refresh_once(self) -> None:
        """One poll, synchronously; never raises."""
        with self._poll_lock:
            try:
                rows = self._fetch()
            except _PollFailed as failed:
                self._failed(failed.reason, failed.detail)
            except Exception as err:
                # A bug here must cost pod labels, not the polling thread.
                self._failed("unexpected error", repr(err), exc_info=True)
            else:
                self._succeeded(rows)

    def _fetch(self) -> list[Row]:
        try:
            grpc = importlib.import_module("grpc")
        except ImportError as err:
            raise _PollFailed("grpcio not installed", str(err)) from None
        try:
            mode = Path(self._socket_path).stat().st_mode
        except FileNotFoundError:
            raise _PollFailed("socket missing", self._socket_path) from None
        except OSError as err:
            raise _PollFailed((err.strerror or type(err).__name__).lower(), str(err)) from None
        if not stat.S_ISSOCK(mode):
            raise _PollFailed("not a socket", self._socket_path)
        reply = _call_list(grpc, self._target, self._timeout)
        try:
            return decode_list_response(reply)
        except ValueError as err:
            raise _PollFailed("malformed response", str(err)) from None

    def _failed(self, reason: str, detail: str, *, exc_info: bool = False) -> None:
        old = self._state
        self._state = replace(old, up=False, errors=old.errors + 1, last_error=reason)
        # Once per distinct reason until the next success, so a kubelet that stays away (or
        # flaps between two symptoms) does not fill the log every interval.
        if reason not in self._reported:
            self._reported.add(reason)
            log.warning(
                "cannot list pod resources from the kubelet",
                extra={"reason": reason, "detail": detail, "socket": self._socket_path},
                exc_info=exc_info,
            )

    def _succeeded(self, rows: list[Row]) -> None:
        old = self._state
        mapping = _assign(rows, self._prefixes)
        self._state = _State(
            assignments=mapping,
            up=True,
            last_success=time.time(),
            fresh_until=time.monotonic() + self._stale_after,
            errors=old.errors,
            last_error="",
        )
        self._reported.clear()
        if not old.up:
            log.info(
                "listing pod resources from the kubelet",
                extra={"devices": len(mapping), "socket": self._socket_path},
            )

    def assignments(self) -> Assignments:
        """Device key (GPU or MIG UUID) -> who has it; the last successful result (immutable),
        or nothing once that is too old."""
        state = self._state
        if time.monotonic() > state.fresh_until:
            return _EMPTY
        return state.assignments

    @property
    def up(self) -> bool:
        """Whether the latest poll succeeded."""
        return self._state.up

    @property
    def last_success(self) -> float | None:
        """Unix time of the latest successful poll."""
        return self._state.last_success

    @property
    def errors(self) -> int:
        """Failed polls so far."""
        return self._state.errors

    @property
    def last_error(self) -> str:
        """Short reason the latest poll failed, e.g. "timeout"; empty while up."""
        return self._state.last_error
