"""The exporter-toolkit web configuration file (`--web.config.file`): TLS, basic auth, headers.

node_exporter, dcgm-exporter and every other exporter built on prometheus/exporter-toolkit read
the same YAML file, so an operator can point nvml-exporter at the file they already have. Every
key of the format is either honoured or rejected with a reason; none is silently ignored,
because a security setting that quietly does nothing is worse than an error.

What Python's `ssl` module cannot do exactly, and what happens instead:

- `client_auth_type: RequestClientCert` asks for a certificate that Go never verifies nor
  requires. OpenSSL can only ask for a certificate it then verifies, so it is mapped to
  CERT_NONE: every client Go would admit is admitted; nothing here reads an unverified
  certificate anyway.
- `client_auth_type: RequireAnyClientCert` requires a certificate without verifying it. Python
  cannot accept an unverified certificate, and dropping the requirement would let clients
  without one in, so it is mapped to CERT_REQUIRED and needs `client_ca_file` (a self-signed
  client certificate can be listed there as its own trust anchor).
- `cipher_suites` applies to TLS 1.2 and older; TLS 1.3 suites are fixed by OpenSSL (Go does
  not let them be configured either), so TLS 1.3 names are accepted and have no effect.
- `min_version: TLS10`/`TLS11` are applied, but the system OpenSSL policy (security level 2 on
  OpenSSL 3) still refuses those protocols; it is not lowered here.
- `http_server_config.http2` is validated; the server speaks HTTP/1.1 either way.
- Inline `cert`/`key`/`client_ca`, `client_allowed_sans` and a non-empty `curve_preferences`
  are rejected: see `_UNSUPPORTED`.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import enum
import hashlib
import hmac
import logging
import math
import re
import secrets
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import bcrypt

from exporter.validation import (
    ConfigError,
    InvalidValue,
    join_path,
    parse_bool,
    parse_choice,
    parse_mapping,
    read_yaml,
    short_repr,
)

log = logging.getLogger(__name__)

CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
# exporter-toolkit still accepts this older spelling, so files written for it may use it.
_CLIENT_AUTH_ALIASES = {"RequireClientCert": "RequireAnyClientCert"}
_VERIFY_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,  # see the module docstring
    "RequireAnyClientCert": ssl.CERT_REQUIRED,  # see the module docstring
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = MappingProxyType(
    {
        "TLS10": ssl.TLSVersion.TLSv1,
        "TLS11": ssl.TLSVersion.TLSv1_1,
        "TLS12": ssl.TLSVersion.TLSv1_2,
        "TLS13": ssl.TLSVersion.TLSv1_3,
    }
)
DEFAULT_MIN_VERSION = "TLS12"  # exporter-toolkit's default
DEFAULT_MAX_VERSION = "TLS13"

# The suites Go's tls.CipherSuites() returns (what exporter-toolkit accepts), by their Go/IANA
# names, with OpenSSL's name for each. Go lists the RSA key exchange suites as insecure, so the
# toolkit rejects them and so does this table.
TLS12_CIPHER_SUITES: Mapping[str, str] = MappingProxyType(
    {
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    }
)
TLS13_CIPHER_SUITES = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)

# The only headers the toolkit lets a file set, with the values allowed where it restricts them.
HEADERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "Content-Security-Policy": (),
        "X-Frame-Options": ("deny", "sameorigin"),
        "X-Content-Type-Options": ("nosniff",),
        "X-XSS-Protection": (),
        "Strict-Transport-Security": (),
    }
)

# Python's ssl module loads a certificate chain only from files, and rotation is noticed by
# watching files, so inline PEM has no place here.
_INLINE = "inline PEM is not supported by nvml-exporter; put it in a file named by {}"
_UNSUPPORTED = {
    "cert": _INLINE.format("cert_file"),
    "key": _INLINE.format("key_file"),
    "client_ca": _INLINE.format("client_ca_file"),
    "client_allowed_sans": (
        "is not supported by nvml-exporter: Python's ssl module cannot check a client "
        "certificate's SANs during the handshake; sign client certificates with a dedicated CA "
        "in client_ca_file instead"
    ),
    "curve_preferences": (
        "is not supported by nvml-exporter: Python's ssl module cannot set a list of curves, "
        "so OpenSSL's defaults are used; remove the key"
    ),
}
# An empty list of SANs means "no SAN is allowed" to the toolkit, so only null counts as unset.
_UNSET_VALUES: dict[str, tuple[object, ...]] = {
    "cert": (None, ""),
    "key": (None, ""),
    "client_ca": (None, ""),
    "client_allowed_sans": (None,),
    "curve_preferences": (None, []),
}
# Setting any of these turns TLS on, as in exporter-toolkit.
_TLS_SWITCHES = ("cert_file", "key_file", "client_ca_file", "client_auth_type")
_TLS_KEYS = (
    *_TLS_SWITCHES,
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    *_UNSUPPORTED,
)

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt reads at most this many bytes of a password; Go and htpasswd ignore the rest.
_BCRYPT_MAX_PASSWORD = 72
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go accepts both micro signs
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

RELOAD_CHECK_INTERVAL = 1.0  # seconds between looks at the files' metadata
# Seconds a verified user/password pair skips bcrypt after its last use: longer than any
# scrape interval in use, so a scraper that keeps coming back never waits for bcrypt again,
# whatever else is hammering the exporter. The pair is keyed to the stored hash, so changing or
# removing the user ends it at the next reload.
AUTH_CACHE_TTL = 900.0
# Seconds a refused pair is refused again without bcrypt: a flood that repeats one wrong
# password costs one check a minute.
AUTH_FAILURE_TTL = 60.0
_AUTH_CACHE_SIZE = 1024
# bcrypt is deliberately slow (tens of ms of a core at cost 10); two workers bound what a flood
# of bad credentials can take from the exporter, and keep it off the default executor.
_BCRYPT_WORKERS = 2
# Checks allowed to wait for a worker; beyond this a new password is answered 429 at once, so
# the wait for a check stays short and its queue cannot grow with the flood.
MAX_PENDING_PASSWORD_CHECKS = 16
# A serving certificate this close to its end is warned about at every load.
CERTIFICATE_WARNING_SECONDS = 14 * 24 * 3600.0


class AuthVerdict(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"  # answer 401
    BUSY = "busy"  # too many password checks waiting: answer 429, try again later


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str  # absolute: relative paths are resolved against the web config's directory
    key_file: str
    client_ca_file: str | None
    client_auth_type: str  # one of CLIENT_AUTH_TYPES
    min_version: str | None  # a key of TLS_VERSIONS; None means DEFAULT_MIN_VERSION
    max_version: str | None  # None means DEFAULT_MAX_VERSION
    cipher_suites: tuple[str, ...]  # Go/IANA names; empty means OpenSSL's defaults
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: one request per `interval` seconds on average, bursts of `burst`."""

    interval: float
    burst: int


@dataclass(frozen=True)
class WebSettings:
    tls: TlsSettings | None
    users: Mapping[str, str]  # user -> bcrypt hash ($2a$, $2b$, $2y$)
    headers: Mapping[str, str]  # http_server_config.headers, blank ones left out
    rate_limit: RateLimit | None = None


# --- value parsers: each takes (value, key path) and raises InvalidValue naming the path --------


def _text(value: object, path: str) -> str:
    # The toolkit's YAML decoder turns any scalar into a string field (`X-XSS-Protection: 1`).
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidValue(path, f"must be a string, got {short_repr(value)}")
    return str(value)


def _go_duration(value: object, path: str) -> float:
    """Seconds from a Go duration string (`1s`, `1m30s`, `250ms`); a bare 0 also means zero."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        parts = _GO_DURATION_PART.findall(text)
        if parts and "".join(number + unit for number, unit in parts) == text:
            seconds = sum(float(number) * _GO_DURATION_UNITS[unit] for number, unit in parts)
            if math.isfinite(seconds):
                return seconds
    # A bare number other than 0 would be nanoseconds to the toolkit: surely not what was meant.
    raise InvalidValue(path, f"must be a duration like 1s or 500ms, got {short_repr(value)}")


def _file(value: object, path: str, base: Path) -> str | None:
    """An absolute path for a file key; relative paths are relative to the web config file."""
    if value is None or value == "":
        return None
    resolved = str(base / _text(value, path))  # an absolute value replaces `base`
    try:
        with Path(resolved).open("rb"):
            pass
    except OSError as err:
        raise InvalidValue(path, f"cannot read {resolved}: {err.strerror or err}") from None
    return resolved


def _parse_tls(raw: object, path: str, base: Path) -> TlsSettings | None:
    data = parse_mapping(raw, path, _TLS_KEYS)
    for key, reason in _UNSUPPORTED.items():
        if key in data and data[key] not in _UNSET_VALUES[key]:
            raise InvalidValue(join_path(path, key), reason)

    def at(key: str) -> str:
        return join_path(path, key)

    if not any(data.get(key) not in (None, "") for key in _TLS_SWITCHES):
        # The toolkit would serve plain HTTP here; an operator who set a TLS option surely
        # expected TLS, so say so instead.
        for key, value in data.items():
            if value not in (None, "", []) and key not in (*_TLS_SWITCHES, *_UNSUPPORTED):
                raise InvalidValue(at(key), "has no effect without cert_file and key_file")
        return None

    cert_file = _file(data.get("cert_file"), at("cert_file"), base)
    key_file = _file(data.get("key_file"), at("key_file"), base)
    if cert_file is None:
        raise InvalidValue(at("cert_file"), "is required when TLS is configured")
    if key_file is None:
        raise InvalidValue(at("key_file"), "is required when TLS is configured")
    client_ca_file = _file(data.get("client_ca_file"), at("client_ca_file"), base)

    auth = data.get("client_auth_type")
    if auth in (None, ""):
        auth = "NoClientCert"
    auth = _CLIENT_AUTH_ALIASES.get(auth, auth) if isinstance(auth, str) else auth
    client_auth_type = parse_choice(auth, at("client_auth_type"), CLIENT_AUTH_TYPES)
    if _VERIFY_MODES[client_auth_type] != ssl.CERT_NONE and client_ca_file is None:
        raise InvalidValue(
            at("client_ca_file"),
            f"is required with client_auth_type {client_auth_type}: client certificates are "
            "verified against it",
        )
    if client_auth_type == "NoClientCert" and client_ca_file is not None:
        raise InvalidValue(
            at("client_ca_file"),
            "is set but client_auth_type is NoClientCert, so no client certificate would be "
            "checked; use RequireAndVerifyClientCert",
        )

    versions = tuple(TLS_VERSIONS)
    min_version = data.get("min_version")
    max_version = data.get("max_version")
    if min_version is not None:
        min_version = parse_choice(min_version, at("min_version"), versions)
    if max_version is not None:
        max_version = parse_choice(max_version, at("max_version"), versions)
    low = min_version or DEFAULT_MIN_VERSION
    high = max_version or DEFAULT_MAX_VERSION
    if TLS_VERSIONS[high] < TLS_VERSIONS[low]:
        raise InvalidValue(at("max_version"), f"must not be below min_version {low}, got {high}")

    cipher_suites = _cipher_suites(data.get("cipher_suites"), at("cipher_suites"))
    if (
        cipher_suites
        and not any(name in TLS12_CIPHER_SUITES for name in cipher_suites)
        and TLS_VERSIONS[high] < ssl.TLSVersion.TLSv1_3
    ):
        raise InvalidValue(
            at("cipher_suites"),
            f"lists only TLS 1.3 suites, so nothing could be negotiated up to max_version {high}",
        )

    prefer = data.get("prefer_server_cipher_suites")
    return TlsSettings(
        cert_file=cert_file,
        key_file=key_file,
        client_ca_file=client_ca_file,
        client_auth_type=client_auth_type,
        min_version=min_version,
        max_version=max_version,
        cipher_suites=cipher_suites,
        prefer_server_cipher_suites=True
        if prefer is None
        else parse_bool(prefer, at("prefer_server_cipher_suites")),
    )


def _cipher_suites(raw: object, path: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidValue(path, f"must be a list, got {type(raw).__name__}")
    known = (*TLS12_CIPHER_SUITES, *TLS13_CIPHER_SUITES)
    for i, name in enumerate(raw):
        if name not in known:
            raise InvalidValue(
                f"{path}[{i}]",
                f"unknown cipher suite {short_repr(name)} (known: {', '.join(known)})",
            )
    return tuple(raw)


def _parse_http(raw: object, path: str) -> Mapping[str, str]:
    data = parse_mapping(raw, path, ("http2", "headers"))
    if "http2" in data:
        # Validated so the file means the same everywhere; this server only speaks HTTP/1.1,
        # which both values permit (HTTP/2 was only ever offered, never required).
        parse_bool(data["http2"], join_path(path, "http2"))
    headers_path = join_path(path, "headers")
    headers: dict[str, str] = {}
    for name, raw_value in parse_mapping(data.get("headers"), headers_path, tuple(HEADERS)).items():
        where = join_path(headers_path, name)
        value = "" if raw_value is None else _text(raw_value, where)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise InvalidValue(where, "must not contain control characters")
        allowed = HEADERS[name]
        if value and allowed and value not in allowed:
            raise InvalidValue(
                where, f"must be one of {', '.join(allowed)}, got {short_repr(value)}"
            )
        if value:  # a blank value means "do not send the header"
            headers[name] = value
    return MappingProxyType(headers)


def _parse_users(raw: object, path: str) -> Mapping[str, str]:
    if raw is None:
        return MappingProxyType({})
    if not isinstance(raw, dict):
        raise InvalidValue(
            path, f"must be a mapping of user names to bcrypt hashes, got {short_repr(raw)}"
        )
    users: dict[str, str] = {}
    for raw_name, hashed in raw.items():
        name = _text(raw_name, path)
        where = join_path(path, name)
        if ":" in name:
            raise InvalidValue(where, "user names cannot contain ':' (basic auth splits on it)")
        # The value is a secret: the reason never repeats it.
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            raise InvalidValue(
                where,
                "must be a bcrypt hash ($2a$, $2b$ or $2y$, cost 04-31), "
                "e.g. from `htpasswd -nBC 10 '' | tr -d ':\\n'`",
            )
        users[name] = hashed
    return MappingProxyType(users)


def _parse_rate_limit(raw: object, path: str) -> RateLimit | None:
    data = parse_mapping(raw, path, ("interval", "burst"))
    interval = _go_duration(data.get("interval", 0), join_path(path, "interval"))
    burst = data.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise InvalidValue(
            join_path(path, "burst"), f"must be a non-negative integer, got {short_repr(burst)}"
        )
    if interval == 0:  # the documented way to switch the limiter off
        return None
    if burst < 1:
        raise InvalidValue(
            join_path(path, "burst"),
            "must be at least 1 when rate_limit.interval is set, or every request is refused",
        )
    return RateLimit(interval=interval, burst=burst)


def _parse(raw: object, base: Path) -> WebSettings:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidValue("", f"must be a mapping, got {type(raw).__name__}")
    known = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
    for key in raw:
        if key not in known:
            raise InvalidValue(str(key), f"unknown key (known: {', '.join(known)})")
    return WebSettings(
        tls=_parse_tls(raw.get("tls_server_config"), "tls_server_config", base),
        users=_parse_users(raw.get("basic_auth_users"), "basic_auth_users"),
        headers=_parse_http(raw.get("http_server_config"), "http_server_config"),
        rate_limit=_parse_rate_limit(raw.get("rate_limit"), "rate_limit"),
    )


# --- TLS ---------------------------------------------------------------------------------------


class _NoPassword(Exception):
    pass


def _refuse_password() -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _NoPassword


def _load_cert_chain(ctx: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_password)
    except _NoPassword:
        raise InvalidValue(
            "tls_server_config.key_file", "is encrypted; an unencrypted key is needed"
        ) from None
    except ssl.SSLError as err:
        raise InvalidValue(
            "tls_server_config.key_file",
            f"cannot be loaded or does not match cert_file: {err.reason or err}",
        ) from None


def _read_client_cas(tls: TlsSettings) -> str | None:
    """The client CA bundle, read once so a context and the check of it see the same bytes."""
    if tls.client_ca_file is None:
        return None
    try:
        return Path(tls.client_ca_file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not PEM text"
        raise InvalidValue("tls_server_config.client_ca_file", f"cannot read: {reason}") from None


def _build_context(tls: TlsSettings, client_cas: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Checks the certificate file on its own first, so a broken one is reported as such rather
    # than as a key problem.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.cert_file)
    except (ssl.SSLError, ValueError) as err:
        raise InvalidValue(
            "tls_server_config.cert_file", f"is not a PEM certificate: {err}"
        ) from None
    _load_cert_chain(ctx, tls)
    if client_cas is not None:
        try:
            ctx.load_verify_locations(cadata=client_cas)
        except (ssl.SSLError, ValueError) as err:
            raise InvalidValue(
                "tls_server_config.client_ca_file", f"holds no usable PEM certificate: {err}"
            ) from None
    ctx.verify_mode = _VERIFY_MODES[tls.client_auth_type]
    low = TLS_VERSIONS[tls.min_version or DEFAULT_MIN_VERSION]
    if tls.cipher_suites and not any(name in TLS12_CIPHER_SUITES for name in tls.cipher_suites):
        # No suite left for TLS 1.2 and older: only TLS 1.3 can be negotiated, as in Go.
        low = max(low, ssl.TLSVersion.TLSv1_3)
    ctx.minimum_version = low
    ctx.maximum_version = TLS_VERSIONS[tls.max_version or DEFAULT_MAX_VERSION]
    openssl_names = [TLS12_CIPHER_SUITES[n] for n in tls.cipher_suites if n in TLS12_CIPHER_SUITES]
    if openssl_names:
        try:
            ctx.set_ciphers(":".join(openssl_names))
        except ssl.SSLError:
            raise InvalidValue(
                "tls_server_config.cipher_suites",
                "none of these suites is available in this OpenSSL build",
            ) from None
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # Go's server never renegotiates; client-initiated renegotiation only costs CPU.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def _copy_policy(source: ssl.SSLContext, target: ssl.SSLContext) -> None:
    """Makes `target` negotiate like `source` (versions, suites, options, client checks)."""
    target.minimum_version = source.minimum_version
    target.maximum_version = source.maximum_version
    target.options = source.options
    tls12 = [c["name"] for c in source.get_ciphers() if c["protocol"] != "TLSv1.3"]
    target.set_ciphers(":".join(tls12))
    target.verify_mode = source.verify_mode


# --- certificate expiry -------------------------------------------------------------------------

_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----"
)


def _der_element(der: bytes, at: int) -> tuple[int, int, int]:
    """The tag, content start and content end of the DER element at `at`."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or at + count > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def _der_time(tag: int, text: bytes) -> float:
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = str(year + (1900 if year >= 50 else 2000)).encode() + text[2:]
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    if len(text) != 15 or not text.endswith(b"Z"):
        raise ValueError("not a UTC time")
    fields = [int(text[i : i + width]) for i, width in ((0, 4), (4, 2), (6, 2), (8, 2), (10, 2))]
    return float(calendar.timegm((*fields, int(text[12:14]), 0, 0, 0)))


def certificate_not_after(pem: str) -> float:
    """Unix time at which the first certificate in `pem` expires (its notAfter)."""
    # The ssl module decodes only certificates of a verified peer, so the few DER fields on the
    # way to the validity period (RFC 5280 4.1) are walked here.
    match = _PEM_CERTIFICATE.search(pem)
    if match is None:
        raise ValueError("no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(match.group(0))
    _, certificate, _ = _der_element(der, 0)
    _, at, _ = _der_element(der, certificate)  # tbsCertificate
    tag, _, end = _der_element(der, at)
    if tag == 0xA0:  # an explicit version comes first
        at = end
        tag, _, end = _der_element(der, at)
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, at = _der_element(der, at)
    _, validity, _ = _der_element(der, at)
    _, _, after_not_before = _der_element(der, validity)
    tag, start, end = _der_element(der, after_not_before)
    return _der_time(tag, der[start:end])


# --- loading -----------------------------------------------------------------------------------

_Stat = tuple[int, int, int, int, int] | None


def _stat(path: str) -> _Stat:
    try:
        st = Path(path).stat()  # follows symlinks, so a Kubernetes secret's ..data swap shows
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


def _watched(path: str, settings: WebSettings) -> tuple[str, ...]:
    tls = settings.tls
    if tls is None:
        return (path,)
    return (path, tls.cert_file, tls.key_file, *filter(None, [tls.client_ca_file]))


@dataclass(frozen=True)
class _Loaded:
    settings: WebSettings
    context: ssl.SSLContext | None
    client_cas: str | None
    # Metadata of the files read, taken before reading them: a change made while they were
    # being read shows up at the next check.
    signature: tuple[_Stat, ...]
    certificate_expiry: float | None


def _load(path: str) -> _Loaded:
    config_stat = _stat(path)
    raw = read_yaml(path)  # duplicate keys refused: a second `alice` must not replace the first
    try:
        # Not resolved through symlinks, as in the toolkit: a mounted ConfigMap's web.yml is a
        # symlink into a hidden directory, and paths are meant relative to where it is mounted.
        settings = _parse(raw, Path(path).absolute().parent)
        signature = (config_stat, *(_stat(p) for p in _watched(path, settings)[1:]))
        context = client_cas = None
        expiry: float | None = None
        if settings.tls is not None:
            client_cas = _read_client_cas(settings.tls)
            context = _build_context(settings.tls, client_cas)
            expiry = _certificate_expiry(settings.tls.cert_file)
    except InvalidValue as err:
        raise ConfigError(f"{path}: {err}") from None
    return _Loaded(settings, context, client_cas, signature, expiry)


def _certificate_expiry(cert_file: str) -> float | None:
    try:
        # latin-1 takes any byte: OpenSSL skips text around the PEM block, and so does this.
        return certificate_not_after(Path(cert_file).read_bytes().decode("latin-1"))
    except (OSError, ValueError):
        # OpenSSL has just loaded this file, so only an encoding this reader does not know is
        # left; the certificate is served all the same, just without an expiry gauge.
        log.warning("cannot read the serving certificate's expiry", extra={"file": cert_file})
        return None


def load_web_config(path: str) -> WebSettings:
    """Reads and fully validates a web config file, certificates and keys included."""
    return _load(path).settings


def _update_context(
    live: ssl.SSLContext, new: ssl.SSLContext, tls: TlsSettings, client_cas: str | None
) -> None:
    """Brings the server's one SSLContext in line with `new`, freshly built and validated."""
    verifying = new.verify_mode != ssl.CERT_NONE
    # An SSLContext's trust store only grows: a CA dropped from the file would stay trusted,
    # which is exactly what removing it is meant to prevent.
    if verifying and not set(live.get_ca_certs(True)) <= set(new.get_ca_certs(True)):
        raise InvalidValue(
            "tls_server_config.client_ca_file", "removing a CA certificate needs a restart"
        )
    # The files were read for `new` a moment ago. Should they have changed since and fail
    # now, the error is reported and the load retried at the next check.
    _load_cert_chain(live, tls)
    if verifying and client_cas is not None:
        live.load_verify_locations(cadata=client_cas)
    _copy_policy(new, live)


# --- live state --------------------------------------------------------------------------------


class _TokenBucket:
    def __init__(self, limit: RateLimit, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)  # starts full, like Go's rate.Limiter
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        elapsed = max(0.0, now - self._at)
        self._tokens = min(self.limit.burst, self._tokens + elapsed / self.limit.interval)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def _dummy_hash(users: Mapping[str, str]) -> bytes:
    """A hash no password matches, at the cost most users have, checked for unknown users so
    that they take as long as a wrong password (mixed costs cannot be hidden entirely)."""
    costs = Counter(int(hashed[4:6]) for hashed in users.values())
    cost = max(costs, key=lambda c: (costs[c], c)) if costs else 10
    # A real salt and an all-zero checksum: bcrypt does the full work and never matches.
    return bcrypt.gensalt(rounds=cost, prefix=b"2b") + b"." * 31


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
    except ValueError:  # a hash the library cannot parse: no password matches it
        return False


def _parse_basic(authorization: str | None) -> tuple[bytes, bytes] | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


@dataclass(frozen=True)
class _State:
    settings: WebSettings
    signature: tuple[_Stat, ...]
    users: tuple[tuple[bytes, bytes], ...]
    dummy_hash: bytes
    limiter: _TokenBucket | None
    certificate_expiry: float | None


class WebSecurity:
    """Live state built from a web config file; the HTTP server asks it per connection/request.

    Meant to be used from the server's event loop thread; only bcrypt leaves it.
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._clock = clock
        self._wall_clock = wall_clock
        loaded = _load(path)
        self._context = loaded.context
        self._state = self._new_state(loaded, None)
        self._checked_at = clock()
        self._last_error: str | None = None
        self.reload_successful = True
        self._expiry_warned: str | None = None
        self._cache_key = secrets.token_bytes(32)
        # Keyed by an HMAC of user, password and stored hash; the value is when it expires.
        self._accepted: OrderedDict[bytes, float] = OrderedDict()
        self._refused: OrderedDict[bytes, float] = OrderedDict()
        # Checks running or queued, by key: identical credentials arriving together share one.
        self._checking: dict[bytes, asyncio.Future[bool]] = {}
        self._bcrypt = ThreadPoolExecutor(_BCRYPT_WORKERS, thread_name_prefix="bcrypt")
        self._check_certificate_expiry()

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """One context for the server's lifetime; reloads change it in place."""
        return self._context

    @property
    def headers(self) -> Mapping[str, str]:
        return self._state.settings.headers

    @property
    def auth_required(self) -> bool:
        return bool(self._state.users)

    @property
    def certificate_expiry(self) -> float | None:
        """Unix time the serving certificate expires; None without TLS."""
        return self._state.certificate_expiry

    def allow_request(self) -> bool:
        """False when `rate_limit` is exhausted: answer 429 Too Many Requests."""
        limiter = self._state.limiter
        return limiter is None or limiter.take()

    def maybe_reload(self) -> None:
        """Cheap enough to call on every new connection: at most once a second it stats the web
        config, certificate, key and CA files; on change it reloads (the certificate chain into
        the same SSLContext; users and headers swapped). A file that fails to load is logged
        once and the previous state kept; the load is retried while the files differ."""
        now = self._clock()
        if now - self._checked_at < RELOAD_CHECK_INTERVAL:
            return
        self._checked_at = now
        self._check_certificate_expiry()
        current = self._state
        if tuple(_stat(p) for p in _watched(self._path, current.settings)) == current.signature:
            return
        try:
            loaded = _load(self._path)
            self._apply(loaded)
        except ConfigError as err:
            self.reload_successful = False
            message = str(err)
            if message != self._last_error:
                log.error(
                    "web config not reloaded; keeping the previous settings",
                    extra={"error": message},
                )
                self._last_error = message
            return
        self._last_error = None
        self.reload_successful = True
        log.info("web config reloaded", extra={"file": self._path})
        self._expiry_warned = None  # a new certificate is judged afresh
        self._check_certificate_expiry()

    def _check_certificate_expiry(self) -> None:
        """Warns once when the serving certificate enters its last days, and once when it has
        expired (clients that verify it are refused from then on)."""
        expiry = self._state.certificate_expiry
        if expiry is None:
            return
        left = expiry - self._wall_clock()
        if left <= 0:
            stage = "expired"
        elif left <= CERTIFICATE_WARNING_SECONDS:
            stage = "expiring"
        else:
            stage = None
        if stage is None or stage == self._expiry_warned:
            self._expiry_warned = stage
            return
        self._expiry_warned = stage
        tls = self._state.settings.tls
        assert tls is not None
        not_after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry))
        message = (
            "the serving TLS certificate has expired; clients that verify it are refused"
            if stage == "expired"
            else "the serving TLS certificate expires soon"
        )
        log.warning(message, extra={"cert_file": tls.cert_file, "not_after": not_after})

    def _apply(self, loaded: _Loaded) -> None:
        live, new, tls = self._context, loaded.context, loaded.settings.tls
        if (live is None) != (new is None):
            raise ConfigError(
                f"{self._path}: tls_server_config: turning TLS on or off needs a restart"
            )
        if self._state.users and not loaded.settings.users:
            # A file that lost its users by mistake must not open the metrics to everyone.
            raise ConfigError(
                f"{self._path}: basic_auth_users: turning authentication off needs a restart"
            )
        if live is not None and new is not None and tls is not None:
            try:
                _update_context(live, new, tls, loaded.client_cas)
            except InvalidValue as err:
                raise ConfigError(f"{self._path}: {err}") from None
        self._state = self._new_state(loaded, self._state)

    def _new_state(self, loaded: _Loaded, previous: _State | None) -> _State:
        users = loaded.settings.users
        limit = loaded.settings.rate_limit
        limiter = previous.limiter if previous is not None else None
        if limit is None:
            limiter = None
        elif limiter is None or limiter.limit != limit:  # an unchanged limit keeps its tokens
            limiter = _TokenBucket(limit, self._clock)
        return _State(
            settings=loaded.settings,
            signature=loaded.signature,
            users=tuple((name.encode(), hashed.encode()) for name, hashed in users.items()),
            dummy_hash=_dummy_hash(users),
            limiter=limiter,
            certificate_expiry=loaded.certificate_expiry,
        )

    async def authenticate(self, authorization: str | None) -> AuthVerdict:
        """Checks an `Authorization: Basic ...` header against basic_auth_users; ACCEPTED when
        no users are configured. bcrypt runs in worker threads, never on the event loop, and
        only for credentials not seen lately: verified ones stay verified while they keep
        coming back, refused ones stay refused for a while, and when too many new ones wait
        the answer is BUSY rather than a longer queue."""
        state = self._state
        if not state.users:
            return AuthVerdict.ACCEPTED
        credentials = _parse_basic(authorization)
        if credentials is None:
            return AuthVerdict.REFUSED
        user, password = credentials
        hashed: bytes | None = None
        for name, candidate in state.users:
            # Every name is compared, in constant time, so the match's position does not show.
            if hmac.compare_digest(name, user):
                hashed = candidate
        target = state.dummy_hash if hashed is None else hashed
        key = hmac.new(
            self._cache_key,
            b"".join(len(part).to_bytes(4, "big") + part for part in (user, password, target)),
            hashlib.sha256,
        ).digest()
        now = self._clock()
        if self._remembered(self._accepted, key, now, AUTH_CACHE_TTL):
            return AuthVerdict.ACCEPTED
        if self._remembered(self._refused, key, now, None):
            return AuthVerdict.REFUSED
        check = self._checking.get(key)
        if check is None:
            if len(self._checking) >= MAX_PENDING_PASSWORD_CHECKS:
                return AuthVerdict.BUSY
            loop = asyncio.get_running_loop()
            check = loop.run_in_executor(self._bcrypt, _checkpw, password, target)
            self._checking[key] = check
            check.add_done_callback(lambda _: self._checking.pop(key, None))
        verified = await asyncio.shield(check)
        if verified and hashed is not None:
            self._remember(self._accepted, key, AUTH_CACHE_TTL)
            return AuthVerdict.ACCEPTED
        self._remember(self._refused, key, AUTH_FAILURE_TTL)
        return AuthVerdict.REFUSED

    def _remember(self, cache: OrderedDict[bytes, float], key: bytes, ttl: float) -> None:
        cache[key] = self._clock() + ttl
        cache.move_to_end(key)
        while len(cache) > _AUTH_CACHE_SIZE:
            cache.popitem(last=False)

    @staticmethod
    def _remembered(
        cache: OrderedDict[bytes, float], key: bytes, now: float, extend: float | None
    ) -> bool:
        expires = cache.get(key)
        if expires is None:
            return False
        if expires <= now:
            del cache[key]
            return False
        if extend is not None:
            cache[key] = now + extend
            cache.move_to_end(key)
        return True
