"""The study runner: a tiny 2-arm × 2-seed study, resume, a changed arm, the report's maths, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from trl_refpo.cli import study_runner as study_module
from trl_refpo.cli.study_runner import (
    NO_DIFFERENCE,
    StudyError,
    bootstrap_over_seeds_and_prompts,
    current_runs,
    load_study,
    parse_study,
    pending_runs,
    read_runs,
    run_study,
    summarise,
    write_report,
)
from trl_refpo.testing import save_tiny_llama, tiny_tokenizer, toy_preference_dataset


PROMPTS = [
    {"key": index, "prompt": f"sort : {' '.join(letters)}", "instruction_id_list": ["fake:has_a"], "kwargs": [{}]}
    for index, letters in enumerate(["b a", "c a b", "d c", "a b c d"])
]


def fake_evaluate(model, tokenizer, prompts, *, ref_model=None, pairs=None, seed=0, **_):
    """A stand-in for evaluate_policy: "follows" when the greedy first token of the reply is a letter a–d."""
    import torch

    per_prompt, calls = [], fake_evaluate.calls
    calls.append(seed)
    for row in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            token = model(torch.tensor([ids], device=model.device)).logits[0, -1].argmax().item()
        ok = tokenizer.convert_ids_to_tokens(token) in list("abcd")
        per_prompt.append(
            {
                "key": row["key"],
                "instruction_id_list": row["instruction_id_list"],
                "strict": [ok],
                "loose": [ok],
                "reply_tokens": 1,
                "drift": 0.0 if ref_model is not None else None,
                "pair_correct": None,
                "reply": "",
            }
        )
    share = float(np.mean([p["strict"][0] for p in per_prompt]))
    metrics = {"prompt_strict": share, "instruction_strict": share, "reply_tokens": 1.0}
    if ref_model is not None:
        metrics["drift"] = 0.0
    return SimpleNamespace(
        metrics=metrics,
        intervals={"prompt_strict": (share, share)},
        per_instruction={"fake:has_a": share},
        per_prompt=per_prompt,
    )


fake_evaluate.calls = []


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    save_tiny_llama(folder / "model", tiny_tokenizer())
    toy_preference_dataset(8, conversational=True).to_json(str(folder / "train.jsonl"))
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    pairs = toy_preference_dataset(4, seed=1)  # plain strings, as the IFEval held-out pairs
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    return folder


def study_data(**arm_changes):
    return {
        "recipe": {
            "model_name_or_path": "model",
            "dataset_name": "train.jsonl",
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "max_length": 64,
            "bf16": False,
            "report_to": [],
            "logging_steps": 1,
            "use_cpu": True,
        },
        "evaluation": {"prompts": "prompts.jsonl", "pairs": "pairs.jsonl", "max_new_tokens": 4},
        "seeds": [0, 1],
        "baseline": "dpo",
        "arms": [
            {"name": "dpo", "loss_type": "sigmoid", "beta": 0.1},
            {"name": "flex", "loss_type": "flex_dpo", "beta_chosen": 0.1, "beta_rejected": 0.05, **arm_changes},
        ],
    }


def write_study(folder, data, name="study.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_study_runs_resumes_and_reruns_a_changed_arm(study_dir, tmp_path):
    out = tmp_path / "out"
    path = write_study(study_dir, study_data())

    class Killed(Exception):
        pass

    def kill_after_first(record):
        raise Killed  # the process dies right after writing the first finished run

    fake_evaluate.calls.clear()
    with pytest.raises(Killed):
        run_study(path, out, evaluate=fake_evaluate, after_run=kill_after_first, progress=False)
    assert [(r["arm"], r["seed"]) for r in read_runs(out)] == [("dpo", 0)]
    # the policy before training was evaluated first, once, with no reference (no drift)
    assert fake_evaluate.calls == [0, 0]
    initial = json.loads((out / "initial.json").read_text())
    assert initial["arm"] == "initial policy" and "drift" not in initial["metrics"] and len(initial["per_prompt"]) == 4

    fake_evaluate.calls.clear()
    resumed = run_study(path, out, evaluate=fake_evaluate, progress=False)
    assert [(r["arm"], r["seed"]) for r in resumed] == [("flex", 0), ("dpo", 1), ("flex", 1)]  # seed-major
    assert fake_evaluate.calls == [0, 1, 1]  # the finished (dpo, 0) did not run again
    runs = read_runs(out)
    assert len(runs) == 4 and len({r["config_hash"] for r in runs}) == 4
    record = runs[-1]
    assert record["loss_type"] == "flex_dpo" and record["config"]["beta_rejected"] == 0.05
    assert record["wall_seconds"] > record["train_seconds"] > 0 and record["device"].startswith(("cpu", "cuda"))
    assert len(record["per_prompt"]) == 4 and record["metrics"]["drift"] == 0.0
    # held-out pairs scored by the trainer before and after training: the change is after − before
    assert record["metrics"]["heldout_logps_chosen_change"] != 0.0
    assert np.isfinite(record["metrics"]["heldout_logps_rejected"])
    assert "train/loss" in record["metrics"]

    assert run_study(path, out, evaluate=fake_evaluate, progress=False) == []  # complete: nothing reruns

    changed = write_study(study_dir, study_data(beta_rejected=0.02))
    rerun = run_study(changed, out, evaluate=fake_evaluate, progress=False)
    assert [(r["arm"], r["seed"]) for r in rerun] == [("flex", 0), ("flex", 1)]
    study = load_study(changed)
    current = current_runs(study, read_runs(out))
    assert {seed: run["config"]["beta_rejected"] for seed, run in current["flex"].items()} == {0: 0.02, 1: 0.02}

    summary = write_report(load_study(out / "study.yaml"), out, num_resamples=50)
    text = summary.read_text()
    assert "4 of 4 runs finished" in text and "| flex |" in text and (out / "figures" / "prompt_strict.png").exists()
    assert "| initial policy |" in text and "gain over the initial policy" in text
    rows = json.loads((out / "summary.json").read_text())
    dpo = next(r for r in rows if r["arm"] == "dpo" and r["metric"] == "prompt_strict")
    by_seed = current_runs(study, read_runs(out))["dpo"]
    expected = np.mean([by_seed[s]["metrics"]["prompt_strict"] for s in (0, 1)]) - initial["metrics"]["prompt_strict"]
    assert dpo["gain"] == pytest.approx(expected)


def test_cli_study_report_and_bad_input(study_dir, tmp_path, capsys, monkeypatch):
    from trl_refpo.cli import main

    out = tmp_path / "cli"
    path = write_study(study_dir, study_data(loss_type="flex_dpoo"), "bad.yaml")
    assert main(["study", str(path), "--output_dir", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("trl-refpo study: error: arm 'flex': Unknown loss_type ['flex_dpoo']")
    assert "\n" not in error and not out.exists()  # nothing ran

    monkeypatch.setattr(study_module, "evaluate_initial_policy", lambda study, output_dir, evaluate=None: {})
    monkeypatch.setattr(
        study_module,
        "run_one",
        lambda study, arm, seed, output_dir, evaluate=None: {
            "arm": arm.name,
            "seed": seed,
            "config_hash": study.config_hash(arm, seed),
            "wall_seconds": 1.0,
            "device": "cpu",
            "metrics": {"prompt_strict": float(seed)},
            "per_prompt": [{"key": 0, "strict": [bool(seed)], "loose": [True], "reply_tokens": 1}],
        },
    )
    good = write_study(study_dir, study_data(), "good.yaml")
    assert main(["study", str(good), "--output_dir", str(out)]) == 0
    assert len(read_runs(out)) == 4
    assert main(["study", "report", str(out)]) == 0
    assert "| dpo | 0.500 [" in (out / "summary.md").read_text()
    assert main(["study", "report", str(tmp_path)]) == 2
    assert "has no study.yaml" in capsys.readouterr().err


def test_missing_reference_folder_names_the_arm_before_training(study_dir, tmp_path):
    data = study_data()
    data["arms"][1]["ref_model_name_or_path"] = "sft_reference"
    with pytest.raises(StudyError) as caught:
        run_study(write_study(study_dir, data, "missing.yaml"), tmp_path / "out", evaluate=fake_evaluate)
    assert str(caught.value).startswith("arm 'flex': ref_model_name_or_path 'sft_reference'")
    assert "build_sft_reference.py" in str(caught.value) and read_runs(tmp_path / "out") == []


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"arms": [{"name": "dpo", "loss_type": "sigmoid"}, {"name": "x", "loss_type": "nope"}]},
            "arm 'x': Unknown loss_type ['nope']",
        ),
        (
            {"arms": [{"name": "dpo"}, {"name": "x", "loss_type": "flex_dpo", "beta_rejectd": 0.1}]},
            "arm 'x': Unknown key(s) in its recipe: beta_rejectd (did you mean beta_rejected?)",
        ),
        ({"arms": [{"name": "dpo"}, {"name": "dpo", "beta": 0.5}]}, "arm 'dpo': duplicate arm name"),
        (
            {"arms": [{"name": "dpo", "seeds": [0]}, {"name": "x", "seeds": [0, 1, 2]}]},
            "arm 'x': seeds [1, 2] are missing for the baseline arm 'dpo'",
        ),
        ({"arms": [{"name": "dpo"}, {"name": "x", "seed": 3}]}, "arm 'x': `seed` / `output_dir` are set by the study"),
        ({"baseline": "nope"}, "baseline 'nope' is not an arm"),
    ],
)
def test_bad_study_names_the_arm(change, message):
    with pytest.raises(StudyError) as caught:
        parse_study({**study_data(), **change})
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_intervals_and_paired_differences_by_hand():
    arm = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # seed 0, seed 1; three prompts
    base = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    estimate, low, high = bootstrap_over_seeds_and_prompts(arm, seed=3, num_resamples=200)
    assert estimate == pytest.approx(0.5)  # (2/3 + 1/3) / 2
    diff, d_low, d_high = bootstrap_over_seeds_and_prompts(arm, base, seed=3, num_resamples=200)
    assert diff == pytest.approx(1 / 3)  # 0.5 − (1/3 + 0) / 2

    # the documented resampling, written out: seeds drawn first, then one prompt draw shared by the drawn seeds
    rng = np.random.default_rng(3)
    seed_draws, prompt_draws = rng.integers(0, 2, (200, 2)), rng.integers(0, 3, (200, 3))
    a, b = np.array(arm), np.array(base)
    stats = [np.mean([a[s][p].mean() for s in ss]) for ss, p in zip(seed_draws, prompt_draws)]
    diffs = [np.mean([(a[s][p] - b[s][p]).mean() for s in ss]) for ss, p in zip(seed_draws, prompt_draws)]
    assert (low, high) == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])))
    assert (d_low, d_high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    assert 0 <= d_low < d_high <= 2 / 3 + 1e-12

    # pooled instruction-level accuracy: followed / all instructions of the chosen prompts
    pooled = [[[True, False], [True], [False]]]
    assert bootstrap_over_seeds_and_prompts(pooled, num_resamples=10)[0] == pytest.approx(2 / 4)


def test_summarise_verdicts_on_fixed_runs():
    def run(arm, seed, strict):
        return {
            "arm": arm,
            "seed": seed,
            "metrics": {"prompt_strict": float(np.mean(strict)), "drift": 0.1 * seed},
            "per_prompt": [
                {"key": k, "strict": [s], "loose": [s], "reply_tokens": 1, "drift": 0.1 * seed}
                for k, s in enumerate(strict)
            ],
        }

    follows = [True] * 8
    misses = [False] * 8
    runs = {
        "base": {0: run("base", 0, misses), 1: run("base", 1, misses)},
        "good": {0: run("good", 0, follows), 1: run("good", 1, follows)},
        "same": {0: run("same", 0, misses), 1: run("same", 1, misses)},
    }
    rows = {(r["arm"], r["metric"]): r for r in summarise(runs, "base", ["prompt_strict", "drift"], num_resamples=100)}
    good = rows[("good", "prompt_strict")]
    assert (good["mean"], good["low"], good["high"]) == (1.0, 1.0, 1.0)
    assert (good["diff"], good["diff_low"], good["diff_high"], good["verdict"]) == (1.0, 1.0, 1.0, "better")
    assert rows[("same", "prompt_strict")]["verdict"] == NO_DIFFERENCE
    assert rows[("same", "drift")]["diff"] == 0.0 and "diff" not in rows[("base", "prompt_strict")]
    assert rows[("base", "drift")]["mean"] == pytest.approx(0.05)  # mean over seeds of the per-prompt drift


def test_gain_over_the_initial_policy_by_hand():
    """The initial policy's greedy evaluation is the same for every seed: the gain is the paired difference with
    its values repeated per seed (seeds and prompts resampled as for any paired difference)."""

    def record(strict, pair_accuracy):
        return {
            "metrics": {"prompt_strict": float(np.mean(strict)), "pair_accuracy": pair_accuracy},
            "per_prompt": [
                {"key": k, "strict": [v], "loose": [v], "reply_tokens": 1, "drift": None} for k, v in enumerate(strict)
            ],
        }

    runs = {"arm": {0: record([1, 1, 0], 0.5), 1: record([1, 0, 0], 0.75)}}
    initial = record([0, 1, 0], 0.25)
    rows = summarise(runs, "arm", ["prompt_strict", "pair_accuracy"], num_resamples=200, seed=3, initial=initial)
    strict, pairs = rows
    expected = bootstrap_over_seeds_and_prompts(
        [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]] * 2, seed=3, num_resamples=200
    )
    assert strict["gain"] == pytest.approx(0.5 - 1 / 3)  # (2/3 + 1/3) / 2 − 1/3
    assert (strict["gain"], strict["gain_low"], strict["gain_high"]) == pytest.approx(expected)
    assert pairs["gain"] == pytest.approx(0.625 - 0.25)  # one number per run: seeds resampled only
    assert 0.25 <= pairs["gain_low"] <= pairs["gain_high"] <= 0.5
    moved = record([0, 1, 0], 0.25)
    moved["per_prompt"][0]["key"] = 9
    with pytest.raises(StudyError, match="its evaluation prompts differ from the initial policy's"):
        summarise(runs, "arm", ["prompt_strict"], num_resamples=10, initial=moved)


def test_pair_accuracy_is_the_runs_own_over_all_pairs():
    """Only pairs whose prompt is also an evaluation prompt show up in the per-prompt rows: the report must use each
    run's pair_accuracy over all the held-out pairs, not those few."""
    runs = {
        "base": {
            seed: {
                "arm": "base",
                "seed": seed,
                "metrics": {"pair_accuracy": value},
                "per_prompt": [
                    {"key": 0, "strict": [True], "loose": [True], "reply_tokens": 1, "pair_correct": False},
                    {"key": 1, "strict": [True], "loose": [True], "reply_tokens": 1, "pair_correct": None},
                ],
            }
            for seed, value in ((0, 0.6), (1, 0.8))
        }
    }
    (row,) = summarise(runs, "base", ["pair_accuracy"], num_resamples=100)
    assert row["mean"] == pytest.approx(0.7) and 0.6 <= row["low"] <= row["high"] <= 0.8


def test_pending_runs_uses_the_config_hash(study_dir):
    study = parse_study(study_data(), base_dir=study_dir)
    arm = study.arm("flex")
    assert study.config_hash(arm, 0) != study.config_hash(arm, 1)
    assert study.config_hash(arm, 0) == parse_study(study_data(), base_dir=study_dir).config_hash(arm, 0)
    assert len(pending_runs(study, study_dir / "nothing-here")) == 4


def test_default_evaluation_is_evaluate_policy(study_dir, tmp_path):
    """One tiny run through the real IFEval evaluation (generation, judge, drift, held-out pairs)."""
    pytest.importorskip("if_verifiable")
    rows = [
        {
            "key": f"p{index}",
            "prompt": f"sort : {letters}",
            "instruction_id_list": ["change_case:english_lowercase"],
            "kwargs": [{}],
        }
        for index, letters in enumerate(["b a", "c a b"])
    ]
    (study_dir / "ifeval_rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = study_data()
    data["arms"], data["seeds"] = data["arms"][:1], [0]
    data["evaluation"] = {
        "prompts": "ifeval_rows.jsonl",
        "pairs": "pairs.jsonl",
        "max_new_tokens": 3,
        "num_resamples": 20,
    }
    (record,) = run_study(write_study(study_dir, data, "real.yaml"), tmp_path / "real", progress=False)
    assert [row["key"] for row in record["per_prompt"]] == ["p0", "p1"]
    assert all(len(row["strict"]) == 1 and row["reply_tokens"] <= 3 for row in record["per_prompt"])
    expected = np.mean([all(row["strict"]) for row in record["per_prompt"]])
    assert record["metrics"]["prompt_strict"] == pytest.approx(expected)
    assert {"pair_accuracy", "drift", "reply_tokens"} <= set(record["metrics"])


def test_jobs_need_the_study_file_and_the_default_evaluation(study_dir, tmp_path):
    study = parse_study(study_data(), base_dir=study_dir)
    with pytest.raises(StudyError, match="--jobs > 1 needs the study as a file path"):
        run_study(study, tmp_path / "out", jobs=2, progress=False)
    assert read_runs(tmp_path / "out") == []


def test_jobs_share_the_cores_out_unless_omp_num_threads_is_set(monkeypatch):
    monkeypatch.setattr(study_module.os, "cpu_count", lambda: 16)
    assert study_module.worker_threads(4, environ={}) == 4
    assert study_module.worker_threads(3, environ={}) == 5
    assert study_module.worker_threads(32, environ={}) == 1
    assert study_module.worker_threads(2, environ={"OMP_NUM_THREADS": "1"}) is None


class TwoSlotPool:
    """An executor that runs its first two submissions in threads and keeps the rest pending (no slot frees up in
    this test), so which runs are under way when one fails is fixed, not a race."""

    def __init__(self):
        self.threads = []

    def submit(self, fn, *args):
        import threading
        from concurrent.futures import Future

        future = Future()
        if len(self.threads) < 2:

            def work():
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except Exception as error:
                        future.set_exception(error)

            self.threads.append(threading.Thread(target=work))
            self.threads[-1].start()
        return future


def test_a_failed_concurrent_run_cancels_the_runs_not_started_and_keeps_those_under_way():
    """--jobs: run b fails while run a is under way; a finishes and is kept, c (not started) is cancelled, and b's
    error is raised after a's record."""
    import threading

    b_failed, started, finished = threading.Event(), [], []

    def run(arm_name, seed):
        started.append(arm_name)
        if arm_name == "b":
            b_failed.set()
            raise RuntimeError("run b failed")
        assert b_failed.wait(timeout=10)  # a is still under way when b fails
        return {"arm": arm_name, "seed": seed}

    pool = TwoSlotPool()
    with pytest.raises(RuntimeError, match="^run b failed$"):
        study_module.run_concurrently(pool, run, [("a", 0), ("b", 0), ("c", 0)], finished.append)
    for thread in pool.threads:
        thread.join()
    assert finished == [{"arm": "a", "seed": 0}]
    assert sorted(started) == ["a", "b"]


def test_the_shipped_study_file_is_valid_and_its_data_and_evaluation_resolve():
    """examples/study/seeds.yaml: every arm's loss type and fields known, the baseline's seeds cover every arm, the
    training file and the evaluation splits exist (the SFT reference folder is built on demand, not shipped)."""
    from pathlib import Path

    study = study_module.load_study(Path(__file__).resolve().parents[2] / "examples" / "study" / "seeds.yaml")
    assert len(study.arms) >= 8 and all(len(arm.seeds) == 3 for arm in study.arms)
    assert (study.base_dir / study.recipe["dataset_name"]).is_file()
    assert len(study_module.evaluation_prompts(study)) == study.evaluation["num_prompts"]
    assert len(study_module._evaluation_rows(study, "pairs")) > 0


def test_heldout_pair_logps_of_a_typo_run_are_the_pairs_own(tmp_path):
    """TYPO scores a reference sample beside each pair; the held-out pairs have none (found by the study's typo arm,
    which stopped here). The pair log-probs and accuracy must equal a sigmoid trainer's on the same weights."""
    from trl_refpo import RefPOConfig, RefPOTrainer
    from trl_refpo.cli.study_runner import _pairs_logps
    from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset

    tokenizer = tiny_tokenizer()
    rows = toy_preference_dataset(4, seed=5)
    pairs = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]} for row in rows]
    common = dict(bf16=False, report_to=[], disable_tqdm=True, per_device_eval_batch_size=4, save_strategy="no")
    results = {}
    for loss_type, extra in (
        ("typo", dict(typo_generate_ref_completions=True, typo_generation_max_new_tokens=4)),
        ("sigmoid", {}),
    ):
        args = RefPOConfig(
            output_dir=str(tmp_path / loss_type),
            loss_type=[loss_type],
            typo_generation_cache_dir=str(tmp_path / "cache") if extra else None,
            **common,
            **extra,
        )
        trainer = RefPOTrainer(
            model=tiny_llama(tokenizer, seed=0), args=args, train_dataset=rows, processing_class=tokenizer
        )
        results[loss_type] = _pairs_logps(trainer, pairs)
    assert results["typo"]["logps_chosen"] == pytest.approx(results["sigmoid"]["logps_chosen"], rel=1e-6)
    assert results["typo"]["logps_rejected"] == pytest.approx(results["sigmoid"]["logps_rejected"], rel=1e-6)
    assert results["typo"]["logps_accuracy"] == results["sigmoid"]["logps_accuracy"]
