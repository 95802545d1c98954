"""The exporter-toolkit web configuration file (`--web.config.file`): TLS, basic auth, headers.

node_exporter, dcgm-exporter and every other exporter built on prometheus/exporter-toolkit read
the same YAML file, so an operator can point nvml-exporter at the file they already have. Every
key of the format is either honoured or rejected with a reason; none is silently ignored,
because a security setting that quietly does nothing is worse than an error.

`tls_server_config` is exporter.tls's to read and apply, `basic_auth_users` and `rate_limit`
exporter.auth's; this module reads the file and `http_server_config`, and keeps the live state
the server asks (WebSecurity). `http_server_config.http2` is validated; the server speaks
HTTP/1.1 either way.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from exporter.auth import (
    AuthVerdict,
    BasicAuth,
    RateLimit,
    TokenBucket,
    Users,
    parse_rate_limit,
    parse_users,
)
from exporter.tls import (
    TlsSettings,
    build_context,
    certificate_not_after,
    parse_tls,
    read_client_cas,
    update_context,
)
from exporter.validation import (
    ConfigError,
    InvalidValue,
    join_path,
    parse_bool,
    parse_mapping,
    parse_scalar_text,
    read_yaml,
    short_repr,
)

log = logging.getLogger(__name__)

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

RELOAD_CHECK_INTERVAL = 1.0  # seconds between looks at the files' metadata
# A serving certificate this close to its end is warned about at every load.
CERTIFICATE_WARNING_SECONDS = 14 * 24 * 3600.0


@dataclass(frozen=True)
class WebSettings:
    tls: TlsSettings | None
    users: Mapping[str, str]  # user -> bcrypt hash ($2a$, $2b$, $2y$)
    headers: Mapping[str, str]  # http_server_config.headers, blank ones left out
    rate_limit: RateLimit | None = None


# --- value parsers: each takes (value, key path) and raises InvalidValue naming the path -------


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
        value = "" if raw_value is None else parse_scalar_text(raw_value, where)
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
        tls=parse_tls(raw.get("tls_server_config"), "tls_server_config", base),
        users=parse_users(raw.get("basic_auth_users"), "basic_auth_users"),
        headers=_parse_http(raw.get("http_server_config"), "http_server_config"),
        rate_limit=parse_rate_limit(raw.get("rate_limit"), "rate_limit"),
    )


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
            client_cas = read_client_cas(settings.tls)
            context = build_context(settings.tls, client_cas)
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


# --- live state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    settings: WebSettings
    signature: tuple[_Stat, ...]
    users: Users
    limiter: TokenBucket | None
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
        self._basic_auth = BasicAuth(clock)
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
        return bool(self._state.users.entries)

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
        if self.auth_required and not loaded.settings.users:
            # A file that lost its users by mistake must not open the metrics to everyone.
            raise ConfigError(
                f"{self._path}: basic_auth_users: turning authentication off needs a restart"
            )
        if live is not None and new is not None and tls is not None:
            try:
                update_context(live, new, tls, loaded.client_cas)
            except InvalidValue as err:
                raise ConfigError(f"{self._path}: {err}") from None
        self._state = self._new_state(loaded, self._state)

    def _new_state(self, loaded: _Loaded, previous: _State | None) -> _State:
        limit = loaded.settings.rate_limit
        limiter = previous.limiter if previous is not None else None
        if limit is None:
            limiter = None
        elif limiter is None or limiter.limit != limit:  # an unchanged limit keeps its tokens
            limiter = TokenBucket(limit, self._clock)
        return _State(
            settings=loaded.settings,
            signature=loaded.signature,
            users=Users.of(loaded.settings.users),
            limiter=limiter,
            certificate_expiry=loaded.certificate_expiry,
        )

    async def authenticate(self, authorization: str | None) -> AuthVerdict:
        """Checks an `Authorization: Basic ...` header against basic_auth_users; ACCEPTED when
        no users are configured (see BasicAuth.check)."""
        return await self._basic_auth.check(self._state.users, authorization)
