"""TLS, client certificates and basic auth, end to end with real certificates (trustme),
real bcrypt hashes, and a real Prometheus scraping over TLS with basic auth."""

from __future__ import annotations

import base64
import datetime
import http.client
import re
import ssl
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
from conftest import ExporterProcess, start_exporter
from cryptography import x509
from promserver import prometheus_server

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"


@dataclass
class Pki:
    directory: Path
    ca: trustme.CA
    client_ca: trustme.CA

    @property
    def ca_file(self) -> str:
        return str(self.directory / "ca.pem")

    def issue_server(self) -> None:
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.cert_chain_pems[0].write_to_path(str(self.directory / "server.crt"))
        cert.private_key_pem.write_to_path(str(self.directory / "server.key"))

    def client(self, name: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        cert = (ca or self.client_ca).issue_cert(name)
        crt, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(crt))
        cert.private_key_pem.write_to_path(str(key))
        return str(crt), str(key)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(tmp_path, trustme.CA(), trustme.CA())
    pki.ca.cert_pem.write_to_path(pki.ca_file)
    pki.client_ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    pki.issue_server()
    return pki


def start(pki: Pki, web_config: str) -> ExporterProcess:
    path = pki.directory / "web-config.yml"
    path.write_text(web_config)
    return start_exporter(["--simulate", "2", "--web.config.file", str(path)])


def client_context(
    pki: Pki,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    cert: tuple[str, str] | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_file)
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def get(
    proc: ExporterProcess,
    context: ssl.SSLContext,
    path: str = "/metrics",
    auth: tuple[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes, TlsInfo]:
    host, port = proc.address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
    headers = {}
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    sock = conn.sock
    assert isinstance(sock, ssl.SSLSocket)
    info = TlsInfo(sock.version(), sock.getpeercert())
    result = (response.status, dict(response.getheaders()), body, info)
    conn.close()
    return result


@dataclass
class TlsInfo:
    version: str | None
    peer: dict[str, Any] | None


TLS_ONLY = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


def test_tls12_and_tls13_handshakes_succeed(pki: Pki) -> None:
    proc = start(pki, TLS_ONLY + "  min_version: TLS12\n")
    try:
        twelve = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
        status, _, body, sock = get(proc, twelve)
        assert status == 200 and b"\nnvml_up 1\n" in body
        assert sock.version == "TLSv1.2"
        thirteen = client_context(pki, minimum=ssl.TLSVersion.TLSv1_3)
        status, _, _, sock = get(proc, thirteen)
        assert status == 200 and sock.version == "TLSv1.3"
    finally:
        proc.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls11_is_refused_when_the_minimum_is_tls12(pki: Pki) -> None:
    proc = start(pki, TLS_ONLY + "  min_version: TLS12\n")
    try:
        old = client_context(pki, maximum=ssl.TLSVersion.TLSv1_1)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            get(proc, old)
        assert get(proc, client_context(pki))[0] == 200  # and normal clients still get in
    finally:
        proc.stop()


def test_plain_http_to_a_tls_port_gets_nothing(pki: Pki) -> None:
    proc = start(pki, TLS_ONLY)
    try:
        host, port = proc.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            conn.request("GET", "/metrics")
            conn.getresponse().read()
    finally:
        proc.stop()


def test_client_certificates_required_and_verified(pki: Pki) -> None:
    proc = start(
        pki,
        TLS_ONLY + "  client_ca_file: clients-ca.pem\n"
        "  client_auth_type: RequireAndVerifyClientCert\n",
    )
    try:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            get(proc, client_context(pki))
        stranger = pki.client("stranger", ca=trustme.CA())
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            get(proc, client_context(pki, cert=stranger))
        trusted = pki.client("prometheus")
        status, _, body, _ = get(proc, client_context(pki, cert=trusted))
        assert status == 200 and b"nvml_gpu_up" in body
    finally:
        proc.stop()


def test_a_rotated_certificate_is_served_without_restart(pki: Pki) -> None:
    proc = start(pki, TLS_ONLY)
    try:
        first = get(proc, client_context(pki))[3].peer
        assert first is not None
        time.sleep(1.1)  # past the reload throttle
        pki.issue_server()
        deadline = time.monotonic() + 10
        while True:
            status, _, _, info = get(proc, client_context(pki))
            cert = info.peer
            assert status == 200 and cert is not None
            if cert["serialNumber"] != first["serialNumber"]:
                break
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.2)
        assert proc.proc.poll() is None
    finally:
        proc.stop()


def hashed(password: str, prefix: bytes = b"$2b$") -> str:
    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10))
    return (prefix + digest[4:]).decode()


def test_basic_auth_with_bcrypt_and_htpasswd_hashes(pki: Pki) -> None:
    proc = start(
        pki,
        TLS_ONLY + "basic_auth_users:\n"
        f"  prometheus: {hashed(PASSWORD)}\n"
        f"  htpasswd-user: '{hashed(PASSWORD, b'$2y$')}'\n",
    )
    context = client_context(pki)
    try:
        assert get(proc, context, auth=("prometheus", PASSWORD))[0] == 200
        assert get(proc, context, auth=("htpasswd-user", PASSWORD))[0] == 200
        status, headers, body, _ = get(proc, context, auth=("prometheus", "wrong"))
        assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="')
        assert b"Traceback" not in body
        assert get(proc, context)[0] == 401
        assert get(proc, context, auth=("nobody", PASSWORD))[0] == 401

        def median_seconds(user: str, password: str) -> float:
            times = []
            for n in range(15):
                started = time.perf_counter()
                # A fresh password each time: nothing is served from the success cache.
                assert get(proc, context, auth=(user, f"{password}{n}"))[0] == 401
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        wrong = median_seconds("prometheus", "wrong")
        unknown = median_seconds("nobody", "wrong")
        assert 0.5 < unknown / wrong < 2.0, (unknown, wrong)
    finally:
        proc.stop()


def test_health_endpoints_can_be_left_open_for_probes(pki: Pki, tmp_path: Path) -> None:
    web = tmp_path / "web-config.yml"
    web.write_text(TLS_ONLY + f"basic_auth_users:\n  prometheus: {hashed(PASSWORD)}\n")
    config = tmp_path / "exporter.yaml"
    config.write_text(f"web: {{config_file: {web}, health_without_auth: true}}\n")
    proc = start_exporter(["--simulate", "1", "--config.file", str(config)])
    context = client_context(pki)
    try:
        assert get(proc, context, "/healthz")[0] == 200
        assert get(proc, context, "/readyz")[0] == 200
        assert get(proc, context, "/metrics")[0] == 401
    finally:
        proc.stop()


@pytest.fixture
def secured(pki: Pki) -> Iterator[tuple[ExporterProcess, Pki]]:
    proc = start(
        pki,
        TLS_ONLY + "  client_ca_file: clients-ca.pem\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"basic_auth_users:\n  prometheus: {hashed(PASSWORD)}\n",
    )
    yield proc, pki
    proc.stop()


def test_prometheus_scrapes_over_tls_with_basic_auth(
    secured: tuple[ExporterProcess, Pki], tmp_path: Path
) -> None:
    proc, pki = secured
    crt, key = pki.client("prometheus")
    scrape = {
        "scheme": "https",
        "tls_config": {
            "ca_file": pki.ca_file,
            "cert_file": crt,
            "key_file": key,
            "server_name": "localhost",
        },
        "basic_auth": {"username": "prometheus", "password": PASSWORD},
    }
    with prometheus_server([proc.address], tmp_path / "prom", scrape) as prom:
        result = prom.wait_for_query('up{job="nvml"} == 1', lambda r: len(r) == 1, timeout=30)
        assert len(result) == 1
        gpus = prom.wait_for_query("count(nvml_gpu_up == 1)", lambda r: len(r) == 1)
        assert float(gpus[0]["value"][1]) == 2


def test_certificate_expiry_and_web_config_state_are_exported(pki: Pki) -> None:
    proc = start(pki, TLS_ONLY)
    try:
        status, _, body, _ = get(proc, client_context(pki))
    finally:
        proc.stop()
    assert status == 200
    served = x509.load_pem_x509_certificate((pki.directory / "server.crt").read_bytes())
    values = dict(
        line.rsplit(" ", 1) for line in body.decode().splitlines() if not line.startswith("#")
    )
    expiry = float(values["nvml_exporter_tls_certificate_expiry_timestamp_seconds"])
    assert expiry == served.not_valid_after_utc.timestamp()
    assert float(values["nvml_exporter_web_config_last_reload_successful"]) == 1


def test_a_rotated_certificate_reaches_clients_that_only_trust_the_new_ca(pki: Pki) -> None:
    proc = start(pki, TLS_ONLY)
    try:
        assert get(proc, client_context(pki))[0] == 200
        new_ca = trustme.CA()
        cert = new_ca.issue_cert("127.0.0.1", "localhost")
        for name, blob in (
            ("server.crt", cert.cert_chain_pems[0]),
            ("server.key", cert.private_key_pem),
        ):
            staging = pki.directory / f"{name}.new"
            blob.write_to_path(str(staging))
            staging.replace(pki.directory / name)
        # Only clients that trust the new CA connect from now on, and none may be needed to
        # set the reload off.
        new_ca.cert_pem.write_to_path(pki.ca_file)
        time.sleep(3)
        status, _, _, info = get(proc, client_context(pki))
        assert status == 200
        assert info.peer is not None
    finally:
        proc.stop()


def test_an_expired_certificate_at_start_is_warned_about_in_the_log_format(pki: Pki) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = pki.ca.issue_cert(
        "127.0.0.1",
        "localhost",
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    expired.cert_chain_pems[0].write_to_path(str(pki.directory / "server.crt"))
    expired.private_key_pem.write_to_path(str(pki.directory / "server.key"))
    path = pki.directory / "web-config.yml"
    path.write_text(TLS_ONLY)
    proc = start_exporter(["--simulate", "2", "--web.config.file", str(path)])
    try:
        log = proc.log().splitlines()
    finally:
        proc.stop()
    # One logfmt line like every other, with its level and fields, not Python's bare fallback.
    [warning] = [line for line in log if "certificate has expired" in line]
    assert warning.startswith("ts=")
    assert " level=warn " in warning
    assert "cert_file=" in warning and "server.crt" in warning
    assert re.search(r"not_after=\S+Z", warning)
