"""presence-core: who is here right now, fast, in the Phoenix Presence model.

The public surface is re-exported here; `presence_core.phoenix` (wire codec),
`presence_core.testing` (helpers for users' tests) and `presence_core.scaling` /
`presence_core.metrics` / `presence_core.typing` are modules of their own.
"""

from .errors import (
    InvalidMeta,
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
    UnknownPlan,
)
from .limits import DEFAULT_PLAN, Limits
from .metrics import Metrics
from .scaling import LoadCalendar, LoadSample, ScaleDecision, Threshold, ThresholdScaler
from .table import TOMBSTONE, USING_EXTENSION, PresenceTable, Tombstone
from .tracker import AWAY, BUSY, OFFLINE, ONLINE, Totals, Tracker, UserStatus
from .typing import ConnId, MetricsSink, RawTransport, Scaler, Transport

__all__ = [
    "AWAY",
    "BUSY",
    "DEFAULT_PLAN",
    "OFFLINE",
    "ONLINE",
    "TOMBSTONE",
    "USING_EXTENSION",
    "ConnId",
    "InvalidMeta",
    "LimitExceeded",
    "Limits",
    "LoadCalendar",
    "LoadSample",
    "MetaTooLarge",
    "Metrics",
    "MetricsSink",
    "NotTracked",
    "PresenceError",
    "PresenceTable",
    "PresenceTypeError",
    "PresenceValueError",
    "ProtocolError",
    "QuotaExceeded",
    "RateLimited",
    "RawTransport",
    "ScaleDecision",
    "StoreError",
    "Scaler",
    "Threshold",
    "ThresholdScaler",
    "Tombstone",
    "Totals",
    "Tracker",
    "Transport",
    "UnknownPlan",
    "UserStatus",
]
__version__ = "0.1.0"
