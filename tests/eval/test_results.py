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
    resume_state,
    validate_results,
)


def test_table_formats_ok_and_failed_cells():
    row = {k: 0 for k in RESULT_FIELDS}
    row.update(method="full", budget=None, task="passkey", status="ok", metric="accuracy", value=1.0, samples=3, cache_kv_bytes=2**20)
    table = format_table([row])
    assert "| full |" in table and "1.000" in table
    failed = {**row, "method": "knorm", "budget": 4096, "status": "failed", "error": "ConfigError: too big\nmore", "samples": 0}
    assert "| knorm | 4096 | passkey | accuracy | FAILED: ConfigError: too big | 0 |" in format_table([failed])


def test_results_schema_rejects_bad_records():
    good = {k: 0 for k in RESULT_FIELDS}
    good.update(method="m", budget=0.5, task="t", status="ok", error=None, metric="accuracy", value=0.5, samples=1,
                content_hash="a" * 64, fingerprint="b" * 64)
    validate_results([good])
    for key, bad in [("samples", 0), ("content_hash", "x"), ("budget", "half"), ("prefill_s", -1.0)]:
        with pytest.raises(ValueError, match=key):
            validate_results([{**good, key: bad}])
    with pytest.raises(ValueError, match="missing"):
        validate_results([{k: v for k, v in good.items() if k != "compressor"}])


# ---------------------------------------------------------------------------------------------
# Results you can trust: resume only under the same configuration, unique labels, failures,
# no state leaking between calls, Ctrl-C. A tiny random model keeps every run to seconds.
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
    key = cell_key("knorm", 0.5, "passkey")
    rows = [{"method": "knorm", "budget": 0.5, "task": "passkey", "sample_id": "s0", "fingerprint": fp},
            {"method": "knorm", "budget": 0.5, "task": "passkey", "sample_id": "s0", "fingerprint": fp},  # counted once
            {"method": "snapkv", "budget": 0.5, "task": "passkey", "sample_id": "s0", "fingerprint": "x" * 64}]  # not planned
    state = resume_state(rows, {key: fp}, {fp: ident}, tmp_path)
    assert state.done_ids(key) == {"s0"} and len(state.rows(key, ["s0", "s1"])) == 1
    with pytest.raises(ConfigError, match=r"knorm / budget 0.5 / passkey: decoding.max_new_tokens: 12 -> 1"):
        resume_state(rows, {key: fingerprint(other)}, {fp: ident, fingerprint(other): other}, tmp_path)
