"""presence-core: who is here right now, fast, in the Phoenix Presence model.

The public surface is re-exported here; `presence_core.phoenix` (wire codec),
`presence_core.testing` (helpers for users' tests), `presence_core.auth` (`load_policy`, the
refusal reasons) and `presence_core.scaling` / `presence_core.metrics` / `presence_core.typing`
are modules of their own.
"""

# The exports load on first use (PEP 562): `import presence_core` costs next to nothing, so the
# pytest plugin, which pytest loads in every run where presence-core is installed, adds nothing
# to runs that use none of its fixtures.  Type checkers read the imports below.
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .auth import Access, JwtVerifier, Verified
    from .errors import (
        InvalidMeta,
        KeyMismatch,
        LimitExceeded,
        MetaTooLarge,
        NotTracked,
        PresenceError,
        PresenceTypeError,
        PresenceValueError,
        ProtocolError,
        QuotaExceeded,
        RateLimited,
        StoreError,
        TokenError,
        UnknownPlan,
    )
    from .limits import DEFAULT_PLAN, Limits
    from .metrics import Metrics
    from .scaling import LoadCalendar, LoadSample, ScaleDecision, Threshold, ThresholdScaler
    from .table import TOMBSTONE, USING_EXTENSION, PresenceTable, Tombstone
    from .tracker import AWAY, BUSY, OFFLINE, ONLINE, Totals, Tracker, UserStatus
    from .typing import (
        AsyncRawTransport,
        AsyncTransport,
        ConnId,
        MetricsSink,
        Policy,
        RawTransport,
        Scaler,
        Transport,
    )

_EXPORTS = {
    "AWAY": ".tracker",
    "Access": ".auth",
    "AsyncRawTransport": ".typing",
    "AsyncTransport": ".typing",
    "BUSY": ".tracker",
    "ConnId": ".typing",
    "DEFAULT_PLAN": ".limits",
    "InvalidMeta": ".errors",
    "JwtVerifier": ".auth",
    "KeyMismatch": ".errors",
    "LimitExceeded": ".errors",
    "Limits": ".limits",
    "LoadCalendar": ".scaling",
    "LoadSample": ".scaling",
    "MetaTooLarge": ".errors",
    "Metrics": ".metrics",
    "MetricsSink": ".typing",
    "NotTracked": ".errors",
    "OFFLINE": ".tracker",
    "ONLINE": ".tracker",
    "Policy": ".typing",
    "PresenceError": ".errors",
    "PresenceTable": ".table",
    "PresenceTypeError": ".errors",
    "PresenceValueError": ".errors",
    "ProtocolError": ".errors",
    "QuotaExceeded": ".errors",
    "RateLimited": ".errors",
    "RawTransport": ".typing",
    "ScaleDecision": ".scaling",
    "Scaler": ".typing",
    "StoreError": ".errors",
    "TOMBSTONE": ".table",
    "Threshold": ".scaling",
    "ThresholdScaler": ".scaling",
    "TokenError": ".errors",
    "Tombstone": ".table",
    "Totals": ".tracker",
    "Tracker": ".tracker",
    "Transport": ".typing",
    "USING_EXTENSION": ".table",
    "UnknownPlan": ".errors",
    "UserStatus": ".tracker",
    "Verified": ".auth",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "AWAY",
    "BUSY",
    "DEFAULT_PLAN",
    "OFFLINE",
    "ONLINE",
    "TOMBSTONE",
    "USING_EXTENSION",
    "Access",
    "AsyncRawTransport",
    "AsyncTransport",
    "ConnId",
    "InvalidMeta",
    "JwtVerifier",
    "KeyMismatch",
    "LimitExceeded",
    "Limits",
    "LoadCalendar",
    "LoadSample",
    "MetaTooLarge",
    "Metrics",
    "MetricsSink",
    "NotTracked",
    "Policy",
    "PresenceError",
    "PresenceTable",
    "PresenceTypeError",
    "PresenceValueError",
    "ProtocolError",
    "QuotaExceeded",
    "RateLimited",
    "RawTransport",
    "ScaleDecision",
    "Scaler",
    "StoreError",
    "Threshold",
    "ThresholdScaler",
    "TokenError",
    "Tombstone",
    "Totals",
    "Tracker",
    "Transport",
    "UnknownPlan",
    "UserStatus",
    "Verified",
]
__version__ = "0.1.0"
