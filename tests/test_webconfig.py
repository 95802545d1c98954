"""The exporter-toolkit web config file: parsing, TLS handshakes, reloads, basic auth.

Handshakes run between two in-memory TLS endpoints (ssl.MemoryBIO): no sockets, no threads.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import ssl
import statistics
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import bcrypt
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exporter import auth, webconfig
from exporter.auth import AuthVerdict, RateLimit
from exporter.tls import (
    CLIENT_AUTH_TYPES,
    TLS12_CIPHER_SUITES,
    TLS13_CIPHER_SUITES,
    TlsSettings,
    certificate_not_after,
)
from exporter.validation import ConfigError
from exporter.webconfig import WebSecurity, WebSettings, load_web_config

T = TypeVar("T")

TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def bcrypt_hash(password: str, cost: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def replace_file(path: Path, data: bytes) -> None:
    """Writes a new file over `path` the way rotation tools do: a new inode, renamed in."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    staging.replace(path)


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA
    server: trustme.LeafCert
    client_ca: trustme.CA
    client: trustme.LeafCert
    stranger: trustme.LeafCert  # a client certificate from a CA nobody trusts

    def write_server(self, leaf: trustme.LeafCert, directory: Path | None = None) -> None:
        where = directory or self.dir
        replace_file(where / "server.crt", leaf.cert_chain_pems[0].bytes())
        replace_file(where / "server.key", leaf.private_key_pem.bytes())

    def client_context(
        self,
        cert: trustme.LeafCert | None = None,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
        ciphers: str | None = None,
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
        if ciphers is not None:
            ctx.set_ciphers(ciphers)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, client_ca = trustme.CA(), trustme.CA()
    pki = Pki(
        dir=tmp_path,
        ca=ca,
        server=ca.issue_cert("localhost", "127.0.0.1"),
        client_ca=client_ca,
        client=client_ca.issue_cert("scraper@example.com"),
        stranger=trustme.CA().issue_cert("intruder@example.com"),
    )
    pki.write_server(pki.server)
    (tmp_path / "other.key").write_bytes(ca.issue_cert("localhost").private_key_pem.bytes())
    (tmp_path / "clients-ca.pem").write_bytes(client_ca.cert_pem.bytes())
    (tmp_path / "junk.txt").write_text("not a certificate\n")
    return pki


def write_config(directory: Path, text: str, name: str = "web.yml") -> str:
    path = directory / name
    replace_file(path, text.encode())
    return str(path)


# --- in-memory handshakes ------------------------------------------------------------------------


@dataclass
class Handshake:
    client: ssl.SSLObject
    server: ssl.SSLObject
    errors: dict[str, ssl.SSLError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def server_certificate(self) -> bytes:
        cert = self.client.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def handshake(server_ctx: ssl.SSLContext | None, client_ctx: ssl.SSLContext) -> Handshake:
    """Runs both ends until neither makes progress; TLS 1.3 servers reject client certificates
    after the client has finished, so a refusal may show on the server side only."""
    assert server_ctx is not None
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname="localhost")
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    result = Handshake(client, server)
    finished: set[str] = set()
    for _ in range(50):
        progressed = False
        for name, end in (("client", client), ("server", server)):
            if name in finished or name in result.errors:
                continue
            before = (to_server.pending, to_client.pending)
            try:
                end.do_handshake()
                finished.add(name)
                progressed = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as err:
                result.errors[name] = err
                progressed = True
            progressed = progressed or (to_server.pending, to_client.pending) != before
        if not progressed:
            break
    assert result.errors or finished == {"client", "server"}, "the handshake stalled"
    return result


# --- parsing -------------------------------------------------------------------------------------


def test_full_file_parses(pki: Pki) -> None:
    alice, bob = bcrypt_hash("alice-pw"), "$2y$" + bcrypt_hash("bob-pw")[4:]
    path = write_config(
        pki.dir,
        f"""
tls_server_config:
  cert_file: server.crt
  key_file: {pki.dir / "server.key"}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: clients-ca.pem
  min_version: TLS12
  max_version: TLS13
  cipher_suites:
    - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
    - TLS_AES_128_GCM_SHA256
  prefer_server_cipher_suites: false
  curve_preferences: []
http_server_config:
  http2: false
  headers:
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
    X-XSS-Protection: 1
    Strict-Transport-Security: max-age=31536000; includeSubDomains
    Content-Security-Policy: ""
basic_auth_users:
  alice: {alice}
  bob: {bob}
rate_limit:
  interval: 1m30s
  burst: 20
""",
    )
    assert load_web_config(path) == WebSettings(
        tls=TlsSettings(
            cert_file=str(pki.dir / "server.crt"),
            key_file=str(pki.dir / "server.key"),
            client_ca_file=str(pki.dir / "clients-ca.pem"),
            client_auth_type="RequireAndVerifyClientCert",
            min_version="TLS12",
            max_version="TLS13",
            cipher_suites=(
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                "TLS_AES_128_GCM_SHA256",
            ),
            prefer_server_cipher_suites=False,
        ),
        users=MappingProxyType({"alice": alice, "bob": bob}),
        # A blank header is not sent; a YAML number is the header's text, as in the toolkit.
        headers=MappingProxyType(
            {
                "X-Frame-Options": "deny",
                "X-Content-Type-Options": "nosniff",
                "X-XSS-Protection": "1",
                "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
            }
        ),
        rate_limit=RateLimit(interval=90.0, burst=20),
    )


def test_defaults_and_the_toolkits_sample_shape(pki: Pki) -> None:
    # The shape of the toolkit's documented example: TLS, htpasswd-style users, a rate limit.
    users = "".join(f"  {u}: $2y${bcrypt_hash(u)[4:]}\n" for u in ("alice", "bob"))
    rate = 'rate_limit:\n  interval: "1s"\n  burst: 20\n'
    settings = load_web_config(write_config(pki.dir, TLS + "basic_auth_users:\n" + users + rate))
    assert settings.tls is not None
    assert settings.tls.client_auth_type == "NoClientCert"
    assert settings.tls.min_version is None and settings.tls.max_version is None
    assert settings.tls.cipher_suites == () and settings.tls.prefer_server_cipher_suites
    assert set(settings.users) == {"alice", "bob"} and dict(settings.headers) == {}
    assert settings.rate_limit == RateLimit(interval=1.0, burst=20)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "tls_server_config:\nbasic_auth_users: {}\nhttp_server_config:\n",
        'tls_server_config:\n  cert_file: ""\n  key_file: ""\n  cipher_suites: []\n',
        "rate_limit:\n  interval: 0\n  burst: 0\n",
        "rate_limit:\n  interval: 0s\n",
    ],
)
def test_files_that_turn_nothing_on(tmp_path: Path, text: str) -> None:
    assert load_web_config(write_config(tmp_path, text)) == WebSettings(
        tls=None, users=MappingProxyType({}), headers=MappingProxyType({})
    )


def test_legacy_client_auth_spelling_is_accepted(pki: Pki) -> None:
    path = write_config(
        pki.dir, TLS + "  client_auth_type: RequireClientCert\n  client_ca_file: clients-ca.pem\n"
    )
    tls = load_web_config(path).tls
    assert tls is not None and tls.client_auth_type == "RequireAnyClientCert"


def test_relative_paths_resolve_against_the_config_files_directory(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc" / "tls").mkdir(parents=True)
    pki.write_server(pki.server, tmp_path / "etc" / "tls")
    text = "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: ./tls/../tls/server.key\n"
    path = write_config(tmp_path / "etc", text)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    security = WebSecurity(path)
    tls = load_web_config(path).tls
    assert tls is not None
    assert tls.cert_file == str(tmp_path / "etc" / "tls" / "server.crt")
    assert Path(tls.key_file).resolve() == tmp_path / "etc" / "tls" / "server.key"
    assert handshake(security.ssl_context, pki.client_context()).ok

    # A symlinked config (a mounted ConfigMap) is read relative to where the link is.
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "web.yml").symlink_to(tmp_path / "elsewhere" / "real.yml")
    write_config(tmp_path / "elsewhere", text, name="real.yml")
    with pytest.raises(ConfigError, match=r"tls_server_config\.cert_file: cannot read .*mount"):
        load_web_config(str(tmp_path / "mount" / "web.yml"))


VERIFYING = ("RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
UNSUPPORTED = {
    "cert": "  cert: |\n    -----BEGIN CERTIFICATE-----\n",
    "key": "  key: secret\n",
    "client_ca": "  client_ca: pem\n",
    "client_allowed_sans": "  client_allowed_sans: [scraper@example.com]\n",
    "curve_preferences": "  curve_preferences: [X25519, CurveP256]\n",
}
INVALID: dict[str, tuple[str, str]] = {
    "unknown top-level key": ("tls_server_confg: {}\n", "tls_server_confg: unknown key"),
    "unknown tls key": (TLS + "  cert_filse: x\n", "tls_server_config.cert_filse: unknown key"),
    "unknown http key": (
        "http_server_config:\n  http3: true\n",
        "http_server_config.http3: unknown key",
    ),
    "unknown header": (
        "http_server_config:\n  headers:\n    X-Powered-By: nvml\n",
        "http_server_config.headers.X-Powered-By: unknown key",
    ),
    "unknown rate_limit key": ("rate_limit:\n  period: 1s\n", "rate_limit.period: unknown key"),
    "top level not a mapping": ("- a\n", "must be a mapping, got list"),
    "tls not a mapping": ("tls_server_config: yes\n", "tls_server_config: must be a mapping"),
    "header value": (
        "http_server_config:\n  headers:\n    X-Frame-Options: allowall\n",
        "http_server_config.headers.X-Frame-Options: must be one of deny, sameorigin, "
        "got 'allowall'",
    ),
    "header with a newline": (
        'http_server_config:\n  headers:\n    Content-Security-Policy: "a\\nb"\n',
        "http_server_config.headers.Content-Security-Policy: must not contain control",
    ),
    "http2 not a boolean": (
        "http_server_config:\n  http2: sometimes\n",
        "http_server_config.http2: must be true or false",
    ),
    "client_auth_type": (
        TLS + "  client_auth_type: Bogus\n",
        "tls_server_config.client_auth_type: must be one of NoClientCert, RequestClientCert, "
        "RequireAnyClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert, got 'Bogus'",
    ),
    "min_version": (
        TLS + "  min_version: TLS14\n",
        "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13, got 'TLS14'",
    ),
    "max_version spelling": (
        TLS + "  max_version: tls12\n",
        "tls_server_config.max_version: must be one of TLS10, TLS11, TLS12, TLS13, got 'tls12'",
    ),
    "max below min": (
        TLS + "  min_version: TLS13\n  max_version: TLS12\n",
        "tls_server_config.max_version: must not be below min_version TLS13, got TLS12",
    ),
    "unknown cipher": (
        TLS + "  cipher_suites:\n  - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n"
        "  - TLS_RSA_WITH_AES_128_GCM_SHA256\n",
        "tls_server_config.cipher_suites[1]: unknown cipher suite "
        "'TLS_RSA_WITH_AES_128_GCM_SHA256'",
    ),
    "cipher_suites not a list": (
        TLS + "  cipher_suites: TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n",
        "tls_server_config.cipher_suites: must be a list",
    ),
    "only TLS 1.3 suites up to TLS 1.2": (
        TLS + "  max_version: TLS12\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        "tls_server_config.cipher_suites: lists only TLS 1.3 suites",
    ),
    "prefer_server_cipher_suites": (
        TLS + "  prefer_server_cipher_suites: 1\n",
        "tls_server_config.prefer_server_cipher_suites: must be true or false",
    ),
    "missing cert file": (
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
        "tls_server_config.cert_file: cannot read ",
    ),
    "missing key file": (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: nope.key\n",
        "tls_server_config.key_file: cannot read ",
    ),
    "no cert_file": (
        "tls_server_config:\n  key_file: server.key\n",
        "tls_server_config.cert_file: is required",
    ),
    "no key_file": (
        "tls_server_config:\n  cert_file: server.crt\n",
        "tls_server_config.key_file: is required",
    ),
    "cert file is not PEM": (
        "tls_server_config:\n  cert_file: junk.txt\n  key_file: server.key\n",
        "tls_server_config.cert_file: is not a PEM certificate",
    ),
    "key does not match": (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n",
        "tls_server_config.key_file: cannot be loaded or does not match cert_file",
    ),
    "client CA file is not PEM": (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: junk.txt\n",
        "tls_server_config.client_ca_file: holds no usable PEM certificate",
    ),
    "client CA without client auth": (
        TLS + "  client_ca_file: clients-ca.pem\n",
        "tls_server_config.client_ca_file: is set but client_auth_type is NoClientCert",
    ),
    "TLS option without a certificate": (
        "tls_server_config:\n  min_version: TLS13\n",
        "tls_server_config.min_version: has no effect without cert_file and key_file",
    ),
    "password instead of a hash": (
        "basic_auth_users:\n  alice: hunter2\n",
        "basic_auth_users.alice: must be a bcrypt hash",
    ),
    "user name with a colon": (
        f"basic_auth_users:\n  'a:b': {bcrypt_hash('x')}\n",
        "basic_auth_users.a:b: user names cannot contain ':'",
    ),
    "users not a mapping": (
        "basic_auth_users: [alice]\n",
        "basic_auth_users: must be a mapping",
    ),
    "duplicate user": (
        f"basic_auth_users:\n  alice: {bcrypt_hash('a')}\n  alice: {bcrypt_hash('b')}\n",
        "invalid YAML at line 3, column 3: duplicate key 'alice'",
    ),
    "invalid YAML": ("tls_server_config: [\n", "invalid YAML"),
    "rate_limit interval in bare nanoseconds": (
        "rate_limit:\n  interval: 5\n  burst: 1\n",
        "rate_limit.interval: must be a duration like 1s or 500ms, got 5",
    ),
    "rate_limit refusing everything": (
        "rate_limit:\n  interval: 1s\n  burst: 0\n",
        "rate_limit.burst: must be at least 1",
    ),
    "rate_limit negative burst": (
        "rate_limit:\n  interval: 1s\n  burst: -1\n",
        "rate_limit.burst: must be a non-negative integer",
    ),
    **{
        f"{mode} without a CA": (
            TLS + f"  client_auth_type: {mode}\n",
            f"tls_server_config.client_ca_file: is required with client_auth_type {mode}",
        )
        for mode in VERIFYING
    },
    **{
        f"unsupported {key}": (TLS + text, f"tls_server_config.{key}: ")
        for key, text in UNSUPPORTED.items()
    },
}


@pytest.mark.parametrize(("text", "expected"), INVALID.values(), ids=INVALID.keys())
def test_invalid_files_name_the_file_and_key(pki: Pki, text: str, expected: str) -> None:
    path = write_config(pki.dir, text)
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert str(caught.value).startswith(f"{path}: {expected}")


@pytest.mark.parametrize("key", UNSUPPORTED)
def test_unsupported_keys_say_so(pki: Pki, key: str) -> None:
    with pytest.raises(ConfigError, match="not supported by nvml-exporter"):
        load_web_config(write_config(pki.dir, TLS + UNSUPPORTED[key]))


def test_errors_never_repeat_a_secret(tmp_path: Path) -> None:
    path = write_config(tmp_path, "basic_auth_users:\n  alice: hunter2\n")
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert "hunter2" not in str(caught.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*missing\.yml: cannot read: No such file"):
        load_web_config(str(tmp_path / "missing.yml"))
    with pytest.raises(ConfigError, match="cannot read"):
        WebSecurity(str(tmp_path / "missing.yml"))


@pytest.mark.parametrize("name", [*TLS12_CIPHER_SUITES, *TLS13_CIPHER_SUITES])
def test_every_accepted_cipher_suite_loads_in_this_openssl(pki: Pki, name: str) -> None:
    path = write_config(pki.dir, TLS + f"  cipher_suites: [{name}]\n")
    assert WebSecurity(path).ssl_context is not None


# --- handshakes ----------------------------------------------------------------------------------


def tls_security(pki: Pki, extra: str = "") -> WebSecurity:
    return WebSecurity(write_config(pki.dir, TLS + extra))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls12_and_tls13_handshakes(pki: Pki, version: ssl.TLSVersion) -> None:
    security = tls_security(pki)
    result = handshake(security.ssl_context, pki.client_context(minimum=version, maximum=version))
    assert result.ok, result.errors
    assert result.server.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    assert result.server_certificate() == der(pki.server)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_is_refused_by_the_default_minimum(pki: Pki) -> None:
    security = tls_security(pki)
    assert security.ssl_context is not None
    assert security.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    old_client = pki.client_context(
        minimum=ssl.TLSVersion.TLSv1_1,
        maximum=ssl.TLSVersion.TLSv1_1,
        ciphers="DEFAULT:@SECLEVEL=0",
    )
    result = handshake(security.ssl_context, old_client)
    # Refused for its version (OpenSSL's policy alone would answer "no shared cipher").
    assert result.errors["server"].reason == "UNSUPPORTED_PROTOCOL"
    assert "client" in result.errors


def test_version_bounds(pki: Pki) -> None:
    tls13_only = tls_security(pki, "  min_version: TLS13\n")
    tls12_client = pki.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    assert not handshake(tls13_only.ssl_context, tls12_client).ok

    tls12_only = tls_security(pki, "  max_version: TLS12\n")
    result = handshake(tls12_only.ssl_context, pki.client_context())
    assert result.ok and result.server.version() == "TLSv1.2"
    tls13_client = pki.client_context(minimum=ssl.TLSVersion.TLSv1_3)
    assert not handshake(tls12_only.ssl_context, tls13_client).ok


def test_only_tls13_suites_leave_only_tls13(pki: Pki) -> None:
    security = tls_security(pki, "  cipher_suites: [TLS_AES_256_GCM_SHA384]\n")
    assert handshake(security.ssl_context, pki.client_context()).ok
    tls12_client = pki.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    assert not handshake(security.ssl_context, tls12_client).ok


def test_cipher_suites_restrict_tls12(pki: Pki) -> None:
    security = tls_security(pki, "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n")
    tls12 = ssl.TLSVersion.TLSv1_2
    result = handshake(security.ssl_context, pki.client_context(maximum=tls12))
    assert result.ok
    assert result.server.cipher() is not None
    assert result.server.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"  # type: ignore[index]
    other_suite = pki.client_context(maximum=tls12, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    assert not handshake(security.ssl_context, other_suite).ok


@pytest.mark.parametrize(("prefer", "chosen"), [("true", "AES256"), ("false", "AES128")])
def test_prefer_server_cipher_suites(pki: Pki, prefer: str, chosen: str) -> None:
    security = tls_security(
        pki,
        "  cipher_suites:\n"
        "  - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\n"
        "  - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\n"
        f"  prefer_server_cipher_suites: {prefer}\n",
    )
    client = pki.client_context(
        maximum=ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384",
    )
    result = handshake(security.ssl_context, client)
    cipher = result.server.cipher()
    assert result.ok and cipher is not None and chosen in cipher[0]


# Which clients each client_auth_type admits: none (no certificate), a certificate from the
# configured CA, and one from an unknown CA.
ADMITS = {
    "NoClientCert": (True, True, True),
    "RequestClientCert": (True, True, True),
    "RequireAnyClientCert": (False, True, False),  # Go would also admit the unknown CA's
    "VerifyClientCertIfGiven": (True, True, False),
    "RequireAndVerifyClientCert": (False, True, False),
}


@pytest.mark.parametrize("mode", CLIENT_AUTH_TYPES)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_certificates(pki: Pki, mode: str, version: ssl.TLSVersion) -> None:
    ca = "" if mode == "NoClientCert" else "  client_ca_file: clients-ca.pem\n"
    security = tls_security(pki, f"  client_auth_type: {mode}\n{ca}")
    admitted = tuple(
        handshake(
            security.ssl_context, pki.client_context(cert, minimum=version, maximum=version)
        ).ok
        for cert in (None, pki.client, pki.stranger)
    )
    assert admitted == ADMITS[mode]


def test_verified_client_certificate_is_visible_to_the_server(pki: Pki) -> None:
    security = tls_security(
        pki, "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients-ca.pem\n"
    )
    result = handshake(security.ssl_context, pki.client_context(pki.client))
    peer = result.server.getpeercert()
    assert result.ok and peer is not None
    assert ("email", "scraper@example.com") in peer["subjectAltName"]


def test_require_any_client_cert_accepts_a_pinned_self_signed_certificate(pki: Pki) -> None:
    # RequireAnyClientCert verifies here, unlike in Go; a self-signed client certificate still
    # works when client_ca_file lists it as its own trust anchor.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed-scraper")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (pki.dir / "self.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki.dir / "self.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    security = tls_security(
        pki, "  client_auth_type: RequireAnyClientCert\n  client_ca_file: self.pem\n"
    )
    client = pki.client_context()
    client.load_cert_chain(pki.dir / "self.pem", pki.dir / "self.key")
    assert handshake(security.ssl_context, client).ok
    assert not handshake(security.ssl_context, pki.client_context(pki.stranger)).ok


# --- reloading -----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


def error_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The `error` field of each error the module logged."""
    return [
        str(r.__dict__["error"])
        for r in caplog.records
        if r.name == "exporter.webconfig" and r.levelno >= logging.ERROR
    ]


def test_rotated_certificate_is_loaded_into_the_same_context(pki: Pki, clock: Clock) -> None:
    security = WebSecurity(write_config(pki.dir, TLS), clock=clock)
    context = security.ssl_context
    assert handshake(context, pki.client_context()).server_certificate() == der(pki.server)

    rotated = pki.ca.issue_cert("localhost")
    pki.write_server(rotated)
    security.maybe_reload()  # throttled: not a second since the load
    clock.now += 0.5
    security.maybe_reload()
    assert handshake(context, pki.client_context()).server_certificate() == der(pki.server)

    clock.now += 0.5
    security.maybe_reload()
    assert security.ssl_context is context
    assert handshake(context, pki.client_context()).server_certificate() == der(rotated)


def test_unchanged_files_are_not_reloaded(
    pki: Pki, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    security = WebSecurity(write_config(pki.dir, TLS), clock=clock)
    loads = 0
    real_load = webconfig._load

    def counting_load(path: str) -> Any:
        nonlocal loads
        loads += 1
        return real_load(path)

    monkeypatch.setattr(webconfig, "_load", counting_load)
    for _ in range(3):
        clock.now += 2
        security.maybe_reload()
    assert loads == 0


def test_broken_files_keep_the_old_state_and_are_logged_once(
    pki: Pki, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.webconfig")
    security = WebSecurity(write_config(pki.dir, TLS), clock=clock)
    context = security.ssl_context

    # A new certificate without its key (a rotation caught half way), then garbage.
    rotated = pki.ca.issue_cert("localhost")
    replace_file(pki.dir / "server.crt", rotated.cert_chain_pems[0].bytes())
    for _ in range(3):
        clock.now += 1
        security.maybe_reload()
        assert handshake(context, pki.client_context()).server_certificate() == der(pki.server)
    replace_file(pki.dir / "server.crt", b"garbage\n")
    for _ in range(3):
        clock.now += 1
        security.maybe_reload()
        assert handshake(context, pki.client_context()).server_certificate() == der(pki.server)
    errors = error_logs(caplog)
    assert [error.split(": ")[1] for error in errors] == [
        "tls_server_config.key_file",
        "tls_server_config.cert_file",
    ]

    # The rotation completes: the next check picks it up and says so.
    pki.write_server(rotated)
    clock.now += 1
    security.maybe_reload()
    assert handshake(context, pki.client_context()).server_certificate() == der(rotated)
    assert any(r.getMessage() == "web config reloaded" for r in caplog.records)
    assert security.ssl_context is context


def test_broken_config_keeps_users_and_headers(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    header = "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    users = f"basic_auth_users:\n  alice: {bcrypt_hash('pw')}\n"
    path = write_config(tmp_path, header + users)
    security = WebSecurity(path, clock=clock)
    for broken in ("basic_auth_users: [\n", header + users + "surprise: 1\n"):
        write_config(tmp_path, broken)
        clock.now += 1
        security.maybe_reload()
        clock.now += 1
        security.maybe_reload()
        assert dict(security.headers) == {"X-Frame-Options": "deny"}
        assert run(security.authenticate(basic("alice", "pw"))) is AuthVerdict.ACCEPTED
    assert len(error_logs(caplog)) == 2


def test_users_headers_and_policy_are_swapped(pki: Pki, clock: Clock) -> None:
    path = write_config(pki.dir, TLS)
    security = WebSecurity(path, clock=clock)
    context = security.ssl_context
    assert not security.auth_required and dict(security.headers) == {}
    tls12_client = pki.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    assert handshake(context, tls12_client).ok

    write_config(
        pki.dir,
        TLS
        + "  min_version: TLS13\n"
        + "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        + f"basic_auth_users:\n  bob: {bcrypt_hash('bob-pw')}\n",
    )
    clock.now += 1
    security.maybe_reload()
    assert security.ssl_context is context
    assert security.auth_required
    assert dict(security.headers) == {"X-Content-Type-Options": "nosniff"}
    assert run(security.authenticate(basic("bob", "bob-pw"))) is AuthVerdict.ACCEPTED
    assert not handshake(context, tls12_client).ok
    assert handshake(context, pki.client_context()).ok


def test_client_ca_rotation(pki: Pki, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    mtls = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients-ca.pem\n"
    security = WebSecurity(write_config(pki.dir, TLS + mtls), clock=clock)
    context = security.ssl_context
    new_ca = trustme.CA()
    new_client = new_ca.issue_cert("new-scraper@example.com")
    assert not handshake(context, pki.client_context(new_client)).ok

    # Adding the new CA next to the old one takes effect at once.
    bundle = pki.client_ca.cert_pem.bytes() + new_ca.cert_pem.bytes()
    replace_file(pki.dir / "clients-ca.pem", bundle)
    clock.now += 1
    security.maybe_reload()
    assert handshake(context, pki.client_context(new_client)).ok
    assert handshake(context, pki.client_context(pki.client)).ok

    # Dropping the old CA cannot be done to a live context: refused, logged, nothing changes.
    replace_file(pki.dir / "clients-ca.pem", new_ca.cert_pem.bytes())
    clock.now += 1
    security.maybe_reload()
    assert handshake(context, pki.client_context(pki.client)).ok
    [error] = error_logs(caplog)
    assert "client_ca_file: removing a CA certificate needs a restart" in error


def test_turning_tls_off_needs_a_restart(
    pki: Pki, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(pki.dir, TLS)
    security = WebSecurity(path, clock=clock)
    context = security.ssl_context
    write_config(pki.dir, f"basic_auth_users:\n  alice: {bcrypt_hash('pw')}\n")
    clock.now += 1
    security.maybe_reload()
    assert security.ssl_context is context and not security.auth_required
    [error] = error_logs(caplog)
    assert error == (f"{path}: tls_server_config: turning TLS on or off needs a restart")


def test_turning_authentication_off_needs_a_restart(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, f"basic_auth_users:\n  alice: {bcrypt_hash('pw')}\n")
    security = WebSecurity(path, clock=clock)
    write_config(tmp_path, "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    clock.now += 1
    security.maybe_reload()
    assert security.auth_required
    assert run(security.authenticate(None)) is AuthVerdict.REFUSED
    assert not security.reload_successful
    [error] = error_logs(caplog)
    assert error == f"{path}: basic_auth_users: turning authentication off needs a restart"
    # Users may still change, and a file that is fixed is taken again.
    write_config(tmp_path, f"basic_auth_users:\n  bob: {bcrypt_hash('pw')}\n")
    clock.now += 1
    security.maybe_reload()
    assert security.reload_successful
    assert run(security.authenticate(basic("bob", "pw"))) is AuthVerdict.ACCEPTED


def test_turning_authentication_on_is_a_live_change(tmp_path: Path, clock: Clock) -> None:
    path = write_config(tmp_path, "")
    security = WebSecurity(path, clock=clock)
    write_config(tmp_path, f"basic_auth_users:\n  alice: {bcrypt_hash('pw')}\n")
    clock.now += 1
    security.maybe_reload()
    assert security.auth_required and security.reload_successful


# --- certificate expiry --------------------------------------------------------------------------


def utc(year: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime.datetime:
    return datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    "not_after",
    [
        utc(2030, 1, 2, 3, 4, 5),  # UTCTime
        utc(2049, 12, 31, 23, 59, 59),
        utc(2050, 1, 1, 0, 0, 0),  # GeneralizedTime from 2050 on (RFC 5280)
        utc(2099, 6, 7, 8, 9, 10),
        utc(2001, 2, 3, 4, 5, 6),
    ],
)
def test_certificate_expiry_is_read_from_the_pem(not_after: datetime.datetime) -> None:
    before = not_after - datetime.timedelta(days=1)
    leaf = trustme.CA().issue_cert("localhost", not_before=before, not_after=not_after)
    pem = leaf.cert_chain_pems[0].bytes().decode()
    expected = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
    assert certificate_not_after(pem) == expected.timestamp() == not_after.timestamp()
    # The leaf is read even when a chain and a key share its file.
    bundle = pem + trustme.CA().cert_pem.bytes().decode() + leaf.private_key_pem.bytes().decode()
    assert certificate_not_after(bundle) == not_after.timestamp()


@pytest.mark.parametrize(
    "text", ["", "junk", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"]
)
def test_certificate_expiry_of_no_certificate_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        certificate_not_after(text)


def expiry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "exporter.webconfig" and r.levelno == logging.WARNING
    ]


def test_an_expired_certificate_is_warned_about_at_start_and_exposed(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = pki.ca.issue_cert(
        "localhost",
        not_before=now - datetime.timedelta(days=9),
        not_after=now - datetime.timedelta(days=2),
    )
    pki.write_server(expired)
    security = WebSecurity(write_config(pki.dir, TLS))
    assert expiry_warnings(caplog) == [
        "the serving TLS certificate has expired; clients that verify it are refused"
    ]
    expected = x509.load_pem_x509_certificate(expired.cert_chain_pems[0].bytes())
    assert security.certificate_expiry == expected.not_valid_after_utc.timestamp()


def test_expiry_is_warned_once_per_stage_as_time_passes_and_afresh_after_rotation(
    pki: Pki, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    wall = Clock()
    wall.now = time.time()
    not_after = datetime.datetime.fromtimestamp(wall.now + 30 * 86400, datetime.UTC).replace(
        microsecond=0
    )
    pki.write_server(pki.ca.issue_cert("localhost", not_after=not_after))
    security = WebSecurity(write_config(pki.dir, TLS), clock=clock, wall_clock=wall)
    assert expiry_warnings(caplog) == []
    for _ in range(3):  # the last fortnight begins: one warning, not one a second
        wall.now += 6 * 86400
        clock.now += 1
        security.maybe_reload()
    assert expiry_warnings(caplog) == ["the serving TLS certificate expires soon"]
    wall.now += 13 * 86400
    clock.now += 1
    security.maybe_reload()
    assert expiry_warnings(caplog)[1:] == [
        "the serving TLS certificate has expired; clients that verify it are refused"
    ]
    caplog.clear()
    renewed = pki.ca.issue_cert("localhost")
    pki.write_server(renewed)
    clock.now += 1
    security.maybe_reload()
    assert expiry_warnings(caplog) == []
    assert security.certificate_expiry == (
        x509.load_pem_x509_certificate(
            renewed.cert_chain_pems[0].bytes()
        ).not_valid_after_utc.timestamp()
    )


# --- rate limit ----------------------------------------------------------------------------------


def test_rate_limit_is_a_token_bucket(tmp_path: Path, clock: Clock) -> None:
    security = WebSecurity(
        write_config(tmp_path, "rate_limit:\n  interval: 2s\n  burst: 2\n"), clock=clock
    )
    assert [security.allow_request() for _ in range(3)] == [True, True, False]
    clock.now += 1
    assert not security.allow_request()
    clock.now += 1
    assert [security.allow_request() for _ in range(2)] == [True, False]


def test_no_rate_limit_allows_everything(tmp_path: Path) -> None:
    security = WebSecurity(write_config(tmp_path, ""))
    assert all(security.allow_request() for _ in range(1000))


# --- basic auth ----------------------------------------------------------------------------------


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    alice = bcrypt_hash("alice-pw")
    htpasswd_style = "$2y$" + bcrypt_hash("carol-pw")[4:]
    legacy = "$2a$" + bcrypt_hash("dave-pw")[4:]
    return write_config(
        tmp_path,
        f"basic_auth_users:\n  alice: {alice}\n  carol: '{htpasswd_style}'\n"
        f"  dave: '{legacy}'\n  erin: {bcrypt_hash('e' * 72)}\n",
    )


@pytest.mark.parametrize(
    ("user", "password", "accepted"),
    [
        ("alice", "alice-pw", True),
        ("alice", "wrong", False),
        ("alice", "", False),
        ("mallory", "alice-pw", False),
        ("carol", "carol-pw", True),  # $2y$ (htpasswd)
        ("dave", "dave-pw", True),  # $2a$
        ("Alice", "alice-pw", False),
        # bcrypt reads 72 bytes; Go and htpasswd ignore the rest, and so does this.
        ("erin", "e" * 80, True),
    ],
)
def test_basic_auth(users_file: str, user: str, password: str, accepted: bool) -> None:
    security = WebSecurity(users_file)
    assert security.auth_required
    verdict = AuthVerdict.ACCEPTED if accepted else AuthVerdict.REFUSED
    assert run(security.authenticate(basic(user, password))) is verdict


def test_password_with_a_colon(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"basic_auth_users:\n  alice: {bcrypt_hash('a:b:c')}\n")
    assert run(WebSecurity(path).authenticate(basic("alice", "a:b:c"))) is AuthVerdict.ACCEPTED


def test_scheme_is_case_insensitive(users_file: str) -> None:
    token = base64.b64encode(b"alice:alice-pw").decode()
    assert run(WebSecurity(users_file).authenticate(f"basic {token}")) is AuthVerdict.ACCEPTED


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer " + base64.b64encode(b"alice:alice-pw").decode(),
        "Basic !!!!",
        "Basic YWxpY2U6YWxpY2UtcHc",  # padding missing
        "Basic " + base64.b64encode(b"alice").decode(),  # no colon
        "Basic " + base64.b64encode(b"\xff\xfe:alice-pw").decode(),
        "Basic ÄÖÜ",
        "Basic " + base64.b64encode(b"alice:alice-pw").decode() + " trailing",
    ],
)
def test_malformed_headers_are_refused(users_file: str, header: str | None) -> None:
    assert run(WebSecurity(users_file).authenticate(header)) is AuthVerdict.REFUSED


def test_no_users_means_no_auth(tmp_path: Path) -> None:
    security = WebSecurity(write_config(tmp_path, ""))
    assert not security.auth_required
    assert run(security.authenticate(None)) is AuthVerdict.ACCEPTED


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the threads bcrypt.checkpw ran in, in order."""
    calls: list[str] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(threading.current_thread().name)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    yield calls


def test_bcrypt_runs_off_the_event_loop(users_file: str, bcrypt_calls: list[str]) -> None:
    assert (
        run(WebSecurity(users_file).authenticate(basic("alice", "alice-pw")))
        is AuthVerdict.ACCEPTED
    )
    assert len(bcrypt_calls) == 1
    assert bcrypt_calls[0].startswith("bcrypt") and bcrypt_calls[0] != "MainThread"


def test_verified_credentials_stay_cached_while_they_are_used(
    users_file: str, clock: Clock, bcrypt_calls: list[str]
) -> None:
    security = WebSecurity(users_file, clock=clock)
    right = basic("alice", "alice-pw")
    assert run(security.authenticate(right)) is AuthVerdict.ACCEPTED
    assert run(security.authenticate(right)) is AuthVerdict.ACCEPTED
    assert len(bcrypt_calls) == 1
    # A scraper that keeps coming back within the TTL never waits for bcrypt again.
    for _ in range(10):
        clock.now += auth.AUTH_CACHE_TTL * 0.9
        assert run(security.authenticate(right)) is AuthVerdict.ACCEPTED
    assert len(bcrypt_calls) == 1
    clock.now += auth.AUTH_CACHE_TTL
    assert run(security.authenticate(right)) is AuthVerdict.ACCEPTED
    assert len(bcrypt_calls) == 2


def test_refused_credentials_are_refused_again_without_bcrypt_for_a_while(
    users_file: str, clock: Clock, bcrypt_calls: list[str]
) -> None:
    security = WebSecurity(users_file, clock=clock)
    for _ in range(3):
        assert run(security.authenticate(basic("alice", "guess"))) is AuthVerdict.REFUSED
        assert run(security.authenticate(basic("mallory", "guess"))) is AuthVerdict.REFUSED
    assert len(bcrypt_calls) == 2
    # Repeating a refused pair does not keep it refused: it is checked again after the TTL.
    clock.now += auth.AUTH_FAILURE_TTL * 0.9
    assert run(security.authenticate(basic("alice", "guess"))) is AuthVerdict.REFUSED
    clock.now += auth.AUTH_FAILURE_TTL * 0.2
    assert run(security.authenticate(basic("alice", "guess"))) is AuthVerdict.REFUSED
    assert len(bcrypt_calls) == 3
    # The right password is not affected by the wrong ones.
    assert run(security.authenticate(basic("alice", "alice-pw"))) is AuthVerdict.ACCEPTED


def test_identical_credentials_arriving_together_share_one_check(
    users_file: str, bcrypt_calls: list[str]
) -> None:
    security = WebSecurity(users_file)

    async def together() -> list[AuthVerdict]:
        header = basic("alice", "alice-pw")
        return await asyncio.gather(*(security.authenticate(header) for _ in range(50)))

    assert run(together()) == [AuthVerdict.ACCEPTED] * 50
    assert len(bcrypt_calls) == 1


def test_new_passwords_beyond_the_pending_limit_are_busy_not_queued(
    users_file: str, bcrypt_calls: list[str]
) -> None:
    security = WebSecurity(users_file)
    right = basic("alice", "alice-pw")
    limit = auth.MAX_PENDING_PASSWORD_CHECKS

    async def flood() -> tuple[list[AuthVerdict], AuthVerdict, AuthVerdict]:
        assert await security.authenticate(right) is AuthVerdict.ACCEPTED  # cached from now on
        guesses = [security.authenticate(basic("alice", f"guess{i}")) for i in range(limit + 8)]
        tasks = [asyncio.ensure_future(guess) for guess in guesses]
        await asyncio.sleep(0)  # every guess has asked for its check
        cached = await security.authenticate(right)  # answered at once, flood or not
        new_user = await security.authenticate(basic("carol", "carol-pw"))
        return list(await asyncio.gather(*tasks)), cached, new_user

    verdicts, cached, new_user = run(flood())
    assert cached is AuthVerdict.ACCEPTED
    assert new_user is AuthVerdict.BUSY
    assert verdicts.count(AuthVerdict.REFUSED) == limit
    assert verdicts.count(AuthVerdict.BUSY) == 8
    assert len(bcrypt_calls) == 1 + limit


def test_cache_is_bounded(
    tmp_path: Path, bcrypt_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_AUTH_CACHE_SIZE", 2)
    users = "".join(f"  u{i}: {bcrypt_hash(f'p{i}')}\n" for i in range(3))
    security = WebSecurity(write_config(tmp_path, "basic_auth_users:\n" + users))
    for i in (0, 1, 2, 2, 1):
        assert run(security.authenticate(basic(f"u{i}", f"p{i}"))) is AuthVerdict.ACCEPTED
    assert len(bcrypt_calls) == 3
    assert (
        run(security.authenticate(basic("u0", "p0"))) is AuthVerdict.ACCEPTED
    )  # the oldest entry was evicted
    assert len(bcrypt_calls) == 4


def test_reload_changes_which_password_works(tmp_path: Path, clock: Clock) -> None:
    path = write_config(tmp_path, f"basic_auth_users:\n  alice: {bcrypt_hash('old')}\n")
    security = WebSecurity(path, clock=clock)
    assert run(security.authenticate(basic("alice", "old"))) is AuthVerdict.ACCEPTED  # now cached
    write_config(tmp_path, f"basic_auth_users:\n  alice: {bcrypt_hash('new')}\n")
    clock.now += 1
    security.maybe_reload()
    assert run(security.authenticate(basic("alice", "old"))) is AuthVerdict.REFUSED
    assert run(security.authenticate(basic("alice", "new"))) is AuthVerdict.ACCEPTED


def test_unknown_users_take_as_long_as_wrong_passwords(tmp_path: Path) -> None:
    # A realistic cost (htpasswd -C 10): an unknown user must not answer measurably faster.
    path = write_config(tmp_path, f"basic_auth_users:\n  alice: {bcrypt_hash('pw', cost=10)}\n")
    security = WebSecurity(path)

    async def measure(header: str) -> float:
        start = time.perf_counter()
        assert await security.authenticate(header) is AuthVerdict.REFUSED
        return time.perf_counter() - start

    async def sample() -> tuple[list[float], list[float]]:
        wrong, unknown = [], []
        for i in range(20):  # interleaved, so drifting machine load hits both alike
            wrong.append(await measure(basic("alice", f"guess{i}")))
            unknown.append(await measure(basic(f"nobody{i}", f"guess{i}")))
        return wrong, unknown

    wrong, unknown = run(sample())
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 < ratio < 2.0, (statistics.median(wrong), statistics.median(unknown))


def test_event_loop_keeps_running_during_bcrypt(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"basic_auth_users:\n  alice: {bcrypt_hash('pw', cost=10)}\n")
    security = WebSecurity(path)

    async def scenario() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        await security.authenticate(basic("alice", "wrong"))
        task.cancel()
        return ticks

    assert run(scenario()) > 5


def test_a_web_config_alias_bomb_is_refused_at_the_first_alias(tmp_path: Path) -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    path = write_config(tmp_path, "\n".join(levels) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"YAML aliases \(\*name\) are not supported"):
        load_web_config(path)
    assert time.monotonic() - started < 1


def test_web_config_errors_echo_values_briefly(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"rate_limit: {{interval: 1s, burst: '{'x' * 5000}'}}\n")
    with pytest.raises(ConfigError) as error:
        load_web_config(path)
    assert "rate_limit.burst: must be a non-negative integer" in str(error.value)
    assert len(str(error.value)) < 400


def test_expiry_is_read_from_a_certificate_file_with_text_around_the_pem(pki: Pki) -> None:
    # openssl x509 -text writes a human-readable dump (not always ASCII) before the PEM block.
    pem = pki.server.cert_chain_pems[0].bytes()
    (pki.dir / "server.crt").write_bytes("Subject: CN=Grüße\n".encode("latin-1") + pem)
    security = WebSecurity(write_config(pki.dir, TLS))
    expected = x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    assert security.certificate_expiry == expected
