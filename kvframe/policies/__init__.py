"""Built-in policies. Importing this package registers them (see :mod:`kvframe.registry`)."""

from kvframe.policies import (  # noqa: F401  (imported for registration)
    budgets,
    merge_drop,
    score_knorm,
    score_observed_attention,
    score_random,
    score_sink_recent,
    score_snapkv,
    score_tova,
    select_adaptive_heads,
    select_topk,
    triggers,
)
from kvframe.policies.base import (
    BudgetSchedule,
    CompressionContext,
    KeyMerge,
    Policy,
    Scorer,
    Selection,
    Selector,
    Trigger,
    TriggerEvent,
    ValueMerge,
)

__all__ = [
    "BudgetSchedule",
    "CompressionContext",
    "KeyMerge",
    "Policy",
    "Scorer",
    "Selection",
    "Selector",
    "Trigger",
    "TriggerEvent",
    "ValueMerge",
]
