import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_main_job_runs_end_to_end_with_a_tiny_model(tmp_path):
    import main_job

    results = main_job.main(
        ["--model", "tiny", "--max_steps", "2", "--num_eval_prompts", "6", "--max_new_tokens", "4",
         "--output_dir", str(tmp_path)]
    )
    assert len(results["loss"]) == 2 and all(loss == loss for loss in results["loss"])
    for stage in ("before", "after"):
        rates = results[stage]["constraint_rates"]
        assert set(rates) == {"arithmetic", "max_words", "lowercase", "comma_list", "end_word", "yes_no", "all"}
        assert all(0.0 <= rate <= 1.0 for rate in rates.values())
        assert set(results[stage]["ranking"]) == {"logps/accuracies", "rewards/accuracies"}
        assert len(results[stage]["responses"]) == 6
    for name in ("loss.png", "constraints.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["loss_type"] == "alpha_dpo"


def test_constraint_rates_score_the_dataset_replies():
    import main_job

    from trl_refpo.research.constraint_tasks import constraint_splits

    _, tasks = constraint_splits(num_train=6, num_eval=12, seed=0)
    assert main_job.constraint_rates(tasks, [task.chosen for task in tasks])["all"] == 1.0
    assert main_job.constraint_rates(tasks, [task.rejected for task in tasks])["all"] == 0.0
    replies = [task.chosen if index % 4 == 0 else task.rejected for index, task in enumerate(tasks)]
    mixed = main_job.constraint_rates(tasks, replies)
    assert mixed["all"] == 0.25


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
