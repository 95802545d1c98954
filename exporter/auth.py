"""The web config's `basic_auth_users` and `rate_limit`: password checks by bcrypt, kept off the
event loop, remembered for a while and bounded in how many may wait; and a token bucket that
limits requests.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import math
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType

import bcrypt

from exporter.validation import (
    InvalidValue,
    join_path,
    parse_mapping,
    parse_scalar_text,
    short_repr,
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


class AuthVerdict(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"  # answer 401
    BUSY = "busy"  # too many password checks waiting: answer 429, try again later


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: one request per `interval` seconds on average, bursts of `burst`."""

    interval: float
    burst: int


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


def parse_users(raw: object, path: str) -> Mapping[str, str]:
    if raw is None:
        return MappingProxyType({})
    if not isinstance(raw, dict):
        raise InvalidValue(
            path, f"must be a mapping of user names to bcrypt hashes, got {short_repr(raw)}"
        )
    users: dict[str, str] = {}
    for raw_name, hashed in raw.items():
        name = parse_scalar_text(raw_name, path)
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


def parse_rate_limit(raw: object, path: str) -> RateLimit | None:
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


# --- checks ------------------------------------------------------------------------------------


class TokenBucket:
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
class Users:
    """basic_auth_users as the checks read them."""

    entries: tuple[tuple[bytes, bytes], ...]  # (name, bcrypt hash)
    dummy_hash: bytes

    @classmethod
    def of(cls, users: Mapping[str, str]) -> Users:
        return cls(
            entries=tuple((name.encode(), hashed.encode()) for name, hashed in users.items()),
            dummy_hash=_dummy_hash(users),
        )


class BasicAuth:
    """Answers `Authorization: Basic ...` headers. Meant to be used from the server's event loop
    thread; only bcrypt leaves it."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._cache_key = secrets.token_bytes(32)
        # Keyed by an HMAC of user, password and stored hash; the value is when it expires.
        self._accepted: OrderedDict[bytes, float] = OrderedDict()
        self._refused: OrderedDict[bytes, float] = OrderedDict()
        # Checks running or queued, by key: identical credentials arriving together share one.
        self._checking: dict[bytes, asyncio.Future[bool]] = {}
        self._bcrypt = ThreadPoolExecutor(_BCRYPT_WORKERS, thread_name_prefix="bcrypt")

    async def check(self, users: Users, authorization: str | None) -> AuthVerdict:
        """Checks the header against `users`; ACCEPTED when there are none. bcrypt runs in
        worker threads, never on the event loop, and only for credentials not seen lately:
        verified ones stay verified while they keep coming back, refused ones stay refused for
        a while, and when too many new ones wait the answer is BUSY rather than a longer
        queue."""
        if not users.entries:
            return AuthVerdict.ACCEPTED
        credentials = _parse_basic(authorization)
        if credentials is None:
            return AuthVerdict.REFUSED
        user, password = credentials
        hashed: bytes | None = None
        for name, candidate in users.entries:
            # Every name is compared, in constant time, so the match's position does not show.
            if hmac.compare_digest(name, user):
                hashed = candidate
        target = users.dummy_hash if hashed is None else hashed
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
