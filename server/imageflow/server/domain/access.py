"""Who is calling: principals, roles and the per-principal limits (no transport here; the API edge authenticates)."""

from __future__ import annotations

import contextvars
import enum
import time
from dataclasses import dataclass

from imageflow.common.errors import resource_exhausted


class Role(enum.IntEnum):
    """Roles in increasing power: each includes what the ones below may do."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role | None:
        """`viewer`, `operator` or `admin` (any case); None for anything else."""
        return cls.__members__.get(name.strip().upper())

    @property
    def label(self) -> str:
        """Lower-case name, as written in key files and tokens."""
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a stable name (recorded on what it creates) and its role."""

    name: str
    role: Role

    def may(self, needed: Role) -> bool:
        """Whether this caller's role includes `needed`."""
        return self.role >= needed


ANONYMOUS = Principal("anonymous", Role.ADMIN)
"""The caller when authentication is off (loopback-only binds): may do everything."""

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("imageflow_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being served (ANONYMOUS outside an authenticated call)."""
    return _current.get()


def set_current_principal(principal: Principal) -> contextvars.Token[Principal]:
    """Bind the caller for the rest of this task (the API edge does this once per call)."""
    return _current.set(principal)


class RateLimiter:
    """A token bucket per principal: `rate` requests a second on average, bursts up to `burst`; rate 0 = no limit."""

    def __init__(self, rate: float, burst: int, max_principals: int = 10_000) -> None:
        self._rate = rate
        self._burst = max(1, burst)
        self._max = max_principals
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, principal: str, now: float | None = None) -> None:
        """Take one token or raise RESOURCE_EXHAUSTED naming the limit."""
        if self._rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(principal, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[principal] = (tokens, now)
            raise resource_exhausted(
                "RATE_LIMITED",
                f"{principal} is over the request rate limit of {self._rate:g} requests/s (burst {self._burst}); "
                f"retry in {(1.0 - tokens) / self._rate:.2f} s",
            )
        if len(self._buckets) >= self._max and principal not in self._buckets:
            self._buckets.clear()  # a flood of distinct names must not grow memory without bound
        self._buckets[principal] = (tokens - 1.0, now)
