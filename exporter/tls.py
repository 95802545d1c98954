"""The web config's `tls_server_config`: its settings, the one SSLContext built from them and
kept up to date, and the serving certificate's expiry.

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
- Inline `cert`/`key`/`client_ca`, `client_allowed_sans` and a non-empty `curve_preferences`
  are rejected: see `_UNSUPPORTED`.
"""

from __future__ import annotations

import calendar
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

from exporter.validation import (
    InvalidValue,
    join_path,
    parse_bool,
    parse_choice,
    parse_mapping,
    parse_scalar_text,
    short_repr,
)

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


def _file(value: object, path: str, base: Path) -> str | None:
    """An absolute path for a file key; relative paths are relative to the web config file."""
    if value is None or value == "":
        return None
    resolved = str(base / parse_scalar_text(value, path))  # an absolute value replaces `base`
    try:
        with Path(resolved).open("rb"):
            pass
    except OSError as err:
        raise InvalidValue(path, f"cannot read {resolved}: {err.strerror or err}") from None
    return resolved


def parse_tls(raw: object, path: str, base: Path) -> TlsSettings | None:
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


# --- the SSLContext ----------------------------------------------------------------------------


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


def read_client_cas(tls: TlsSettings) -> str | None:
    """The client CA bundle, read once so a context and the check of it see the same bytes."""
    if tls.client_ca_file is None:
        return None
    try:
        return Path(tls.client_ca_file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not PEM text"
        raise InvalidValue("tls_server_config.client_ca_file", f"cannot read: {reason}") from None


def build_context(tls: TlsSettings, client_cas: str | None) -> ssl.SSLContext:
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


def update_context(
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


def _copy_policy(source: ssl.SSLContext, target: ssl.SSLContext) -> None:
    """Makes `target` negotiate like `source` (versions, suites, options, client checks)."""
    target.minimum_version = source.minimum_version
    target.maximum_version = source.maximum_version
    target.options = source.options
    tls12 = [c["name"] for c in source.get_ciphers() if c["protocol"] != "TLSv1.3"]
    target.set_ciphers(":".join(tls12))
    target.verify_mode = source.verify_mode


# --- certificate expiry ------------------------------------------------------------------------

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
