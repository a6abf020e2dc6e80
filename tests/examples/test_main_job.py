import json
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_main_job_runs_end_to_end_with_a_tiny_model(tmp_path):
    import main_job

    results = main_job.main(
        [
            "--model",
            "tiny",
            "--loss_type",
            "sigmoid",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "2",
            "--num_train",
            "8",
            "--num_eval_prompts",
            "6",
            "--max_new_tokens",
            "4",
            "--num_resamples",
            "50",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert len(results["loss"]) == 2 and all(loss == loss for loss in results["loss"])
    for stage in ("before", "after"):
        metrics, intervals = results[stage]["metrics"], results[stage]["intervals"]
        assert {
            "prompt_strict",
            "prompt_loose",
            "instruction_strict",
            "instruction_loose",
            "pair_accuracy",
            "reply_tokens",
        } <= set(metrics)
        assert all(low <= metrics[key] <= high for key, (low, high) in intervals.items())
        assert len(results[stage]["per_prompt"]) == 6
    assert "drift" not in results["before"]["metrics"] and "drift" in results["after"]["metrics"]
    for name in ("loss.png", "ifeval.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["loss_type"] == "sigmoid"


def test_drift_is_measured_against_the_untrained_weights(tmp_path):
    """The reference for drift is a copy of the initial policy that scores with its OWN weights: a plain deepcopy of a
    model TRL has prepared runs the original's forward (the fused-head closure), so drift read 0 after training."""
    import main_job

    results = main_job.main(
        ["--model", "tiny", "--loss_type", "alpha_dpo", "--learning_rate", "1e-2", "--max_steps", "3"]
        + ["--num_train", "12", "--num_eval_prompts", "6", "--max_new_tokens", "4", "--num_resamples", "20"]
        + ["--output_dir", str(tmp_path)]
    )
    assert results["loss"][0] != results["loss"][-1]  # the policy moved
    assert abs(results["after"]["metrics"]["drift"]) > 1e-3


def test_missing_model_is_one_line_and_exit_code_2(tmp_path, capsys):
    import main_job

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(SystemExit) as exit_info:
        main_job.main(["--model", missing, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: ") and "\n" not in stderr and missing in stderr
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_unknown_offline_model_is_one_line_and_exit_code_2(tmp_path, capsys):
    import main_job

    with pytest.raises(SystemExit) as exit_info:
        main_job.main(["--model", "offline:no-such-model", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert "\n" not in stderr and "offline:smollm2-135m-instruct" in stderr


def test_a_hub_id_is_tried_on_the_hub_and_fails_offline_in_one_line(monkeypatch):
    import main_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(main_job.ModelNotFound, match="could not be loaded"):
        main_job.load_model("no-such-owner/no-such-model")
    with pytest.raises(main_job.ModelNotFound, match="no such folder"):
        main_job.load_model("./no/such/folder")
