import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))


def test_quickstart_runs_and_improves_policy_ranking(tmp_path):
    import quickstart

    before, after = quickstart.main(["--loss_type", "alpha_dpo", "--max_steps", "30", "--output_dir", str(tmp_path)])
    assert after["eval_logps/accuracies"] > before["eval_logps/accuracies"]
    assert after["eval_loss"] < before["eval_loss"]
