"""presence-core: who is here right now, fast, in the Phoenix Presence model.

The public surface is re-exported here; `presence_core.phoenix` (wire codec),
`presence_core.testing` (helpers for users' tests), `presence_core.auth` (`load_policy`, the
refusal reasons) and `presence_core.scaling` / `presence_core.metrics` / `presence_core.typing`
are modules of their own.
"""

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
