"""evaluate_policy: IFEval numbers, intervals by hand, the KV cache after training, bad rows."""

import json

import numpy as np
import pytest

from trl_refpo.research.ifeval_data import make_prompts
from trl_refpo.research.ifeval_eval import (
    METRICS,
    bootstrap_interval,
    bootstrap_resamples,
    evaluate_policy,
    generation_state,
)
from trl_refpo.testing import tiny_llama, tiny_tokenizer


def test_bootstrap_interval_of_a_mean_by_hand():
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    indices = np.random.default_rng(3).integers(0, 5, size=(4, 5))
    means = sorted(sum(values[i] for i in row) / 5 for row in indices)
    assert list(np.sort(bootstrap_resamples(values, seed=3, num_resamples=4))) == means
    # numpy's linear quantile over 4 sorted values: q at position q·3
    low = means[0] + 0.025 * 3 * (means[1] - means[0])
    high = means[2] + (0.975 * 3 - 2) * (means[3] - means[2])
    assert bootstrap_interval(values, seed=3, num_resamples=4) == pytest.approx((low, high))


def test_instruction_level_interval_resamples_prompts_and_pools():
    per_prompt = [[True, False], [True], [False]]
    indices = np.random.default_rng(0).integers(0, 3, size=(5, 3))
    pooled = [sum(sum(per_prompt[i]) for i in row) / sum(len(per_prompt[i]) for i in row) for row in indices]
    assert bootstrap_resamples(per_prompt, seed=0, num_resamples=5).tolist() == pytest.approx(pooled)
    assert bootstrap_interval([[True]] * 7) == (1.0, 1.0)
    assert bootstrap_interval([1.0] * 7) == (1.0, 1.0)


def test_interval_width_of_a_half_rate_over_300_prompts():
    low, high = bootstrap_interval([1.0, 0.0] * 150, seed=0, num_resamples=2000)
    assert low == pytest.approx(0.5 - 1.96 * 0.5 / 300**0.5, abs=0.01)
    assert high == pytest.approx(0.5 + 1.96 * 0.5 / 300**0.5, abs=0.01)


@pytest.fixture
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(tokenizer), tiny_llama(tokenizer, seed=1), tokenizer


def test_report_fields_and_a_known_verdict(tiny, monkeypatch):
    model, ref, tokenizer = tiny
    rows = make_prompts("heldout", 6)
    pairs = [{"key": rows[0]["key"], "prompt": rows[0]["prompt"], "chosen": "a b", "rejected": "c d"}]
    report = evaluate_policy(
        model, tokenizer, rows, ref_model=ref, pairs=pairs, max_new_tokens=4, num_resamples=50, progress=False
    )
    assert set(report.metrics) == set(METRICS) == set(report.intervals)
    assert [p["key"] for p in report.per_prompt] == [r["key"] for r in rows]
    for row, item in zip(rows, report.per_prompt):
        assert item["instruction_id_list"] == row["instruction_id_list"] and len(item["strict"]) == len(row["kwargs"])
        assert item["reply_tokens"] <= 4 and isinstance(item["drift"], float)
    assert report.per_prompt[0]["pair_correct"] in (True, False) and report.per_prompt[1]["pair_correct"] is None
    assert report.metrics["prompt_strict"] == np.mean([all(p["strict"]) for p in report.per_prompt])
    hits = [ok for p in report.per_prompt for ok in p["loose"]]
    assert report.metrics["instruction_loose"] == pytest.approx(sum(hits) / len(hits))
    json.dumps(report.to_dict())
    assert "prompt_strict" in report.table()


def test_drift_is_zero_against_the_policy_itself(tiny):
    model, ref, tokenizer = tiny
    rows = make_prompts("heldout", 4)
    same = evaluate_policy(model, tokenizer, rows, ref_model=model, max_new_tokens=4, num_resamples=20, progress=False)
    assert same.metrics["drift"] == pytest.approx(0.0, abs=1e-6)


def test_generation_uses_the_kv_cache_after_training_left_it_off(tiny):
    model, _, tokenizer = tiny
    model.activation_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    lengths = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            lengths.append(kwargs["input_ids"].shape[1]) if kwargs.get("input_ids") is not None else None
        ),
        with_kwargs=True,
    )
    rows = make_prompts("heldout", 3)
    evaluate_policy(model, tokenizer, rows, max_new_tokens=5, batch_size=3, num_resamples=10, progress=False)
    assert len(lengths) == 5 and lengths[0] > 10 and lengths[1:] == [1, 1, 1, 1]  # prefill, then one token a step
    assert model.training and model.config.use_cache is False and model.is_activation_checkpointing  # restored


def test_generation_state_restores_an_eval_model_too(tiny):
    model, _, _ = tiny
    model.eval()
    with generation_state(model):
        assert not model.training and model.config.use_cache
    assert not model.training and not model.is_activation_checkpointing


def test_a_bad_row_stops_before_generation(tiny):
    model, _, tokenizer = tiny
    rows = make_prompts("heldout", 3)
    rows[2] = {**rows[2], "instruction_id_list": ["detectable_format:no_such_thing"]}
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"row 'heldout-0002': unknown IFEval instruction id"):
        evaluate_policy(model, tokenizer, rows, max_new_tokens=3, progress=False)
    rows = make_prompts("heldout", 3)
    rows[1] = {**rows[1], "kwargs": [{"bogus": 1}] * len(rows[1]["kwargs"])}
    with pytest.raises(ValueError, match=r"row 'heldout-0001': kwargs"):
        evaluate_policy(model, tokenizer, rows, max_new_tokens=3, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match=r"row 0: missing column\(s\) \['kwargs'\]"):
        evaluate_policy(model, tokenizer, [{"prompt": "p", "instruction_id_list": []}], progress=False)
