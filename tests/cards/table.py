"""The table of built-in cards that drives the card tests.

One row per YAML card in ``registry/``: when its trigger fires (``family``), the settings that fit
it to the tests' small inputs, and the properties to check. ``tests/cards/test_cards.py`` runs, for
every row, the YAML load, compiled == eager, and a fast ``attach`` + ``generate`` on a tiny model
with left padding; the per-method suites read their lists from here too. A new card without a row
fails ``test_table_covers_every_card``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["never", "one_shot", "chunked", "decode"]


@dataclass(frozen=True)
class CardCase:
    """How the card tests exercise one card.

    ``family``: when its trigger fires (``never``; ``one_shot``: once after the prefill;
    ``chunked``: per prefill chunk; ``decode``: at every decoding step). ``parity_budget``: the
    budget of the compiled-vs-eager check on 61..137 random slots. ``tiny``: overrides fitting the
    card to the tiny model's short prompts (chunk sizes, sinks, windows) and ``tiny_budget`` its
    budget there. ``exact``: after compression every row and head holds exactly the resolved budget
    (``ragged``: every row's heads hold it jointly). ``row_independent``: a left-padded row compresses
    and generates as it does alone (false where a seeded random draw depends on the batch).
    Cards with ``row_independent`` false say why in a comment. ``seed_method``: one of the founding methods run end to end on the real SmolLM2.
    """

    name: str
    family: Family
    parity_budget: float | int = 0.5
    tiny: dict[str, Any] = field(default_factory=dict)
    tiny_budget: float | int = 0.5
    exact: bool = True
    ragged: bool = False
    row_independent: bool = True
    seed_method: bool = False


_PAIRS = {"trigger.size": 32, "selector.n_sink": 4}  # AsymKV/KVSlimmer chunks at tiny scale
# chunked cards are not row independent: chunk boundaries are cut on the padded batch, so a
# left-padded row's chunks hold other tokens than the same row alone

CARDS: tuple[CardCase, ...] = (
    CardCase("full", "never"),
    CardCase("streaming_llm", "one_shot"),
    CardCase("streaming_llm_reindex", "one_shot"),
    CardCase("knorm", "one_shot"),
    CardCase("random", "one_shot", row_independent=False),  # one seeded draw for the whole batch
    CardCase("snapkv", "one_shot"),
    CardCase("h2o", "one_shot"),
    CardCase("tova", "one_shot"),
    CardCase("pyramidkv", "one_shot", exact=False),  # per-layer budgets: checked in tests/policies/test_budgets.py
    CardCase("adakv", "one_shot", ragged=True),
    # BalanceKV's walk and halvings draw from one seeded generator for the whole batch
    CardCase("balancekv", "one_shot", tiny={"selector.n_sink": 4, "selector.window": 4, "selector.block_size": 16},
             exact=False, row_independent=False, seed_method=True),
    CardCase("balancekv_consistent", "one_shot", tiny={"selector.n_sink": 4, "selector.window": 4, "selector.block_size": 16},
             exact=False, row_independent=False),
    CardCase("balancekv_uniform", "one_shot", tiny={"selector.n_sink": 4, "selector.window": 4},
             exact=False, row_independent=False, seed_method=True),
    CardCase("asymkv", "chunked", parity_budget=0.75, tiny=_PAIRS, tiny_budget=40, exact=False, row_independent=False, seed_method=True),
    CardCase("asymkv_disjoint", "chunked", parity_budget=0.8, tiny=_PAIRS, tiny_budget=48, exact=False, row_independent=False),
    CardCase("kvslimmer", "chunked", parity_budget=0.75, tiny=_PAIRS, tiny_budget=40, exact=False, row_independent=False, seed_method=True),
    CardCase("weightedkv", "decode", seed_method=True),
    CardCase("h2o_decode", "decode", seed_method=True),
    CardCase("tova_decode", "decode", seed_method=True),
    CardCase("streaming_llm_decode", "decode", seed_method=True),
    CardCase("cam", "decode", seed_method=True),
)

BY_NAME = {c.name: c for c in CARDS}


def names(**where: Any) -> list[str]:
    """Card names whose fields equal ``where`` (e.g. ``names(family="decode")``)."""
    return [c.name for c in CARDS if all(getattr(c, k) == v for k, v in where.items())]
