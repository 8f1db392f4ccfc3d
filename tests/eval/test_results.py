"""kvframe.eval.results: cell fingerprints, what differs between two configurations, resume, the
results.json schema and the table."""

from __future__ import annotations

import pytest

from kvframe.errors import ConfigError
from kvframe.eval.results import (
    RESULT_FIELDS,
    cell_identity,
    cell_key,
    describe_difference,
    fingerprint,
    format_table,
    identity_mode,
    resume_state,
    validate_results,
)


def test_table_formats_ok_and_failed_cells():
    row = {k: 0 for k in RESULT_FIELDS}
    row.update(method="full", budget=None, task="passkey", mode="query_aware", status="ok", metric="accuracy", value=1.0, samples=3,
               cache_kv_bytes=2**20)
    table = format_table([row])
    assert table.splitlines()[0].startswith("| method | budget | task | mode | metric | value |")
    assert "| full | — | passkey | query_aware | accuracy | 1.000 | 3 | 1.00 |" in table
    failed = {**row, "method": "knorm", "budget": 4096, "status": "failed", "error": "ConfigError: too big\nmore", "samples": 0}
    assert "| knorm | 4096 | passkey | query_aware | accuracy | FAILED: ConfigError: too big | 0 |" in format_table([failed])


def test_results_schema_rejects_bad_records():
    good = {k: 0 for k in RESULT_FIELDS}
    good.update(method="m", budget=0.5, task="t", mode="query_agnostic", status="ok", error=None, metric="accuracy", value=0.5,
                samples=1, content_hash="a" * 64, fingerprint="b" * 64)
    validate_results([good])
    validate_results([{**good, "mode": "stream"}, {**good, "mode": "query_aware"}])
    for key, bad in [("samples", 0), ("content_hash", "x"), ("budget", "half"), ("prefill_s", -1.0)]:
        with pytest.raises(ValueError, match=key):
            validate_results([{**good, key: bad}])
    with pytest.raises(ValueError, match="missing"):
        validate_results([{k: v for k, v in good.items() if k != "compressor"}])
    with pytest.raises(ValueError, match=r"mode='aware'; accepted: query_agnostic, query_aware, stream"):
        validate_results([{**good, "mode": "aware"}])
    with pytest.raises(ValueError, match=r"missing keys \['mode'\]"):
        validate_results([{k: v for k, v in good.items() if k != "mode"}])
    failed = {**good, "status": "failed", "error": "ConfigError: x", "value": None, "samples": 0}
    validate_results([failed])
    with pytest.raises(ValueError, match="failed record needs its error"):
        validate_results([{**failed, "error": None}])
    with pytest.raises(ValueError, match="status"):
        validate_results([{**good, "status": "done"}])


def _identity(**changes):
    base = dict(model={"kind": "local", "name": "m", "config_sha256": "c" * 64}, dtype="float32", device="cpu",
                task_name="passkey", task_config={"n_samples": 2, "length": 256}, content_hash="a" * 64, task_kind="generation",
                mode="query_agnostic", max_new_tokens=12, compressor={"scorer": {"name": "knorm"}, "budget": 0.5}, seed=0)
    base.update(changes)
    return cell_identity(**base)


def test_fingerprint_changes_with_everything_that_determines_a_result():
    ref = fingerprint(_identity())
    assert ref == fingerprint(_identity()) and len(ref) == 64
    for change in [dict(dtype="bfloat16"), dict(device="cuda"), dict(mode="query_aware"), dict(max_new_tokens=1),
                   dict(seed=1), dict(content_hash="b" * 64), dict(task_config={"n_samples": 3, "length": 256}),
                   dict(compressor={"scorer": {"name": "knorm"}, "budget": 0.25}), dict(model={"kind": "local", "name": "m2"})]:
        assert fingerprint(_identity(**change)) != ref, change


def test_streaming_perplexity_does_not_depend_on_decoding_settings():
    a = _identity(task_kind="perplexity", max_new_tokens=12)
    b = _identity(task_kind="perplexity", max_new_tokens=1, mode="query_aware")
    assert fingerprint(a) == fingerprint(b)


def test_describe_difference_lists_changed_settings():
    text = describe_difference(_identity(), _identity(max_new_tokens=1, dtype="float16"))
    assert text == "decoding.max_new_tokens: 12 -> 1; dtype: 'float32' -> 'float16'"
    assert "no configuration fingerprint" in describe_difference(None, _identity())


def test_resume_state_reuses_matching_samples_and_refuses_others(tmp_path):
    ident = _identity()
    fp = fingerprint(ident)
    other = _identity(max_new_tokens=1)
    key = cell_key("knorm", 0.5, "passkey", "query_agnostic")
    cell = {"method": "knorm", "budget": 0.5, "task": "passkey", "mode": "query_agnostic"}
    rows = [{**cell, "sample_id": "s0", "fingerprint": fp},
            {**cell, "sample_id": "s0", "fingerprint": fp},  # counted once
            {**cell, "method": "snapkv", "sample_id": "s0", "fingerprint": "x" * 64},  # not planned
            {**cell, "mode": "query_aware", "sample_id": "s1", "fingerprint": "y" * 64}]  # the same cell in another mode: not planned
    state = resume_state(rows, {key: fp}, {fp: ident}, tmp_path)
    assert state.done_ids(key) == {"s0"} and len(state.rows(key, ["s0", "s1"])) == 1
    with pytest.raises(ConfigError, match=r"knorm / budget 0.5 / passkey / query_agnostic: decoding.max_new_tokens: 12 -> 1"):
        resume_state(rows, {key: fingerprint(other)}, {fp: ident, fingerprint(other): other}, tmp_path)


def test_records_without_mode_belong_to_the_mode_their_fingerprint_names(tmp_path):
    """predictions.jsonl written before mode was a grid dimension (one mode per run, no mode key)."""
    agnostic, aware = _identity(), _identity(mode="query_aware")
    fa, fw = fingerprint(agnostic), fingerprint(aware)
    ka, kw = cell_key("knorm", 0.5, "passkey", "query_agnostic"), cell_key("knorm", 0.5, "passkey", "query_aware")
    old = [{"method": "knorm", "budget": 0.5, "task": "passkey", "sample_id": "s0", "fingerprint": fa}]
    # matched by fingerprint among the planned modes (no cells.json needed)
    state = resume_state(old, {ka: fa, kw: fw}, {}, tmp_path)
    assert state.done_ids(ka) == {"s0"} and state.done_ids(kw) == set()
    # the other mode alone is planned: the record is not one of its samples, and not a conflict either
    assert resume_state(old, {kw: fw}, {fa: agnostic, fw: aware}, tmp_path).done_ids(kw) == set()
    # a changed setting: the identity in cells.json says which mode conflicts, and what differs
    changed = _identity(max_new_tokens=1)
    with pytest.raises(ConfigError, match=r"knorm / budget 0.5 / passkey / query_agnostic: decoding.max_new_tokens: 12 -> 1"):
        resume_state(old, {ka: fingerprint(changed), kw: fw}, {fa: agnostic, fingerprint(changed): changed, fw: aware}, tmp_path)
    # neither a matching fingerprint nor a known identity: it may be any mode's sample, so it conflicts with each
    with pytest.raises(ConfigError, match=r"(?s)query_agnostic: its samples carry no configuration.*query_aware: its samples"):
        resume_state([{**old[0], "fingerprint": None}], {ka: fa, kw: fw}, {fa: agnostic, fw: aware}, tmp_path)


def test_identity_mode_reads_decoding_or_the_streaming_protocol():
    assert identity_mode(_identity(mode="query_aware")) == "query_aware"
    assert identity_mode(_identity(task_kind="perplexity")) == "stream"
    assert identity_mode(None) is None and identity_mode({"decoding": {}}) is None
