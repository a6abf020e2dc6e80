"""``trl-refpo dpo``: recipes parse as written, legacy keys keep their old meaning or fail clearly, bad input
gives one-line errors, and a tiny end-to-end run trains from a recipe on a local model and dataset."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from deepspeed_launcher import free_port

from trl_refpo.cli import RecipeError, build_trainer, main, parse_recipe, run_dpo
from trl_refpo.cli.checks import required_packages
from trl_refpo.cli.quiet import DEEPSPEED_CPU_LINE, silence_project_triggered_warnings
from trl_refpo.config import RefPOConfig
from trl_refpo.testing import save_tiny_llama, tiny_bpe_tokenizer, tiny_tokenizer, toy_preference_dataset


RECIPES = sorted((Path(__file__).parents[2] / "examples" / "recipes").glob("*.yaml"))
CPU = ["--use_cpu", "--bf16", "false"]


def write_recipe(tmp_path, **keys) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_model"), tiny_tokenizer())


@pytest.fixture(scope="module")
def tiny_ref_dir(tmp_path_factory):
    """A reference with another tokenizer (character BPE, merges across spaces, its own BOS / EOS)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_ref"), tiny_bpe_tokenizer(), seed=1)


@pytest.fixture(scope="module")
def tiny_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    with open(path, "w") as f:
        for row in toy_preference_dataset(24, seed=1):
            f.write(json.dumps(row) + "\n")
    return str(path)


def tiny_recipe(tmp_path, model_dir, data, **keys):
    base = dict(
        model_name_or_path=model_dir,
        torch_dtype="float32",
        dataset_mixture={
            "datasets": [{"id": data, "split": "train", "columns": ["prompt", "chosen", "rejected"], "weight": 1.0}],
            "seed": 0,
        },
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    base.update(keys)
    return write_recipe(tmp_path, **base)


# ------------------------------------------------------------------------------------------ shipped recipes
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_parse(recipe):
    parsed = parse_recipe(["--config", str(recipe), *CPU])
    assert parsed.training_args.loss_type
    assert parsed.script_args.dataset_mixture or parsed.script_args.dataset_name
    assert parsed.model_args.model_name_or_path


def test_handbook_zephyr_recipe_as_written(tmp_path):
    """The alignment-handbook zephyr-7b-beta DPO recipe, verbatim, plus only loss_type and its hyperparameters."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "data" / "zephyr_dpo_config_full.yaml").read_text())
    recipe.update(loss_type="alpha_dpo", alpha=0.1, gamma_beta_ratio=0.5)
    parsed = parse_recipe(["--config", write_recipe(tmp_path, **recipe), *CPU])
    args = parsed.training_args
    assert args.loss_type == ["alpha_dpo"] and args.alpha == 0.1 and args.beta == 0.01
    assert args.max_length == 1024 and parsed.max_prompt_length == 512  # max_prompt_length honoured, not dropped
    assert args.warmup_steps == 0.1  # warmup_ratio → warmup_steps (a ratio in transformers 5)
    assert parsed.script_args.dataset_mixture["test_split_size"] == 2000
    assert any("max_prompt_length" in note for note in parsed.notes)


def test_cli_flags_override_recipe(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", beta=0.1, loss_type="sigmoid")
    parsed = parse_recipe(["--config", path, "--beta", "0.3", "--loss_type", "simpo", *CPU])
    assert parsed.training_args.beta == 0.3 and parsed.training_args.loss_type == ["simpo"]


# ------------------------------------------------------------------------------------------ legacy keys
def test_max_prompt_and_completion_length_set_max_length(tmp_path):
    path = write_recipe(
        tmp_path, model_name_or_path="m", dataset_name="d", max_prompt_length=64, max_completion_length=32
    )
    parsed = parse_recipe(["--config", path, *CPU])
    assert parsed.training_args.max_length == 96
    assert (parsed.max_prompt_length, parsed.max_completion_length) == (64, 32)


@pytest.mark.parametrize("prompt_limit, completion_limit", [(3, 2), (2, None), (None, 1)])
def test_legacy_length_limits_keep_the_same_text_for_a_cross_tokenizer_reference(
    tmp_path, tiny_model_dir, tiny_ref_dir, tiny_jsonl, prompt_limit, completion_limit
):
    """max_prompt_length / max_completion_length cut the policy's ids; the reference (another tokenizer, whose
    BPE merges cross spaces) keeps exactly its tokens lying wholly inside the character span the policy keeps."""
    from transformers import AutoTokenizer

    limits = {k: v for k, v in (("max_prompt_length", prompt_limit), ("max_completion_length", completion_limit)) if v}
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        tiny_jsonl,
        ref_model_name_or_path=tiny_ref_dir,
        ref_tokenizer_name_or_path=tiny_ref_dir,
        **limits,
    )
    trainer = build_trainer(parse_recipe(["--config", path]))
    assert len(trainer.train_dataset) == 24  # prompts longer than max_length are cut, not dropped (TRL ≤ 0.19)
    policy_tokenizer, ref_tokenizer = (AutoTokenizer.from_pretrained(d) for d in (tiny_model_dir, tiny_ref_dir))
    checked = 0
    for example in trainer.train_dataset:  # TRL keeps the text columns (its EOS appended to the completions)
        for side in ("chosen", "rejected"):
            text = example["prompt"] + example[side].removesuffix(policy_tokenizer.eos_token)
            policy = policy_tokenizer(text + policy_tokenizer.eos_token, return_offsets_mapping=True)["offset_mapping"]
            prompt_len = len(policy_tokenizer(example["prompt"])["input_ids"])
            first = prompt_len - min(prompt_len, prompt_limit or prompt_len)
            last = prompt_len + min(len(policy) - prompt_len, completion_limit or len(policy)) - 1
            char_start = policy[first][0] if first > 0 else 0
            char_end = policy[last][1] if last < len(policy) - 1 else len(text) + 1
            full_ids = policy_tokenizer(text + policy_tokenizer.eos_token)["input_ids"]
            assert example["prompt_ids"] + example[f"{side}_ids"] == full_ids[first : last + 1]  # as TRL ≤ 0.19 cut
            reference = ref_tokenizer(text + ref_tokenizer.eos_token, return_offsets_mapping=True)
            spans = reference["offset_mapping"]
            inside = [i for i, (s, e) in enumerate(spans) if s >= char_start and e <= char_end and (s, e) != (0, 0)]
            expected_start = inside[0] if first > 0 else 0
            expected_end = inside[-1] + 1 if char_end <= len(text) else len(spans)
            kept = example["ref_prompt_ids"][example[f"ref_{side}_prompt_start"] :] + example[f"ref_{side}_ids"]
            assert kept == reference["input_ids"][expected_start:expected_end], (text, side)
            checked += (first > 0) + (char_end <= len(text))
    assert checked > 10  # the limits did cut most examples, on both sides


def test_legacy_length_limits_with_a_prior_reference_keep_the_policys_completion(tmp_path, tiny_model_dir, tiny_jsonl):
    """ref_prompt: none (likelihood): the prompt limit does not touch the prior; the completion limit cuts it alike."""
    path = tiny_recipe(
        tmp_path, tiny_model_dir, tiny_jsonl, loss_type="likelihood", max_prompt_length=2, max_completion_length=2
    )
    trainer = build_trainer(parse_recipe(["--config", path]))
    for example in trainer.train_dataset:
        for side in ("chosen", "rejected"):
            assert example[f"ref_{side}_prompt_start"] == 0 and len(example["prompt_ids"]) <= 2
            assert example[f"ref_{side}_ids"] == example[f"{side}_ids"]  # the same tokenizer: the same 2 tokens


def test_explicit_max_length_is_kept(tmp_path):
    path = write_recipe(
        tmp_path,
        model_name_or_path="m",
        dataset_name="d",
        max_prompt_length=64,
        max_completion_length=32,
        max_length=80,
    )
    assert parse_recipe(["--config", path, *CPU]).training_args.max_length == 80


@pytest.mark.parametrize(
    "loss_type, weights, expected_types, expected_weights",
    [
        ("sigmoid", None, ["sigmoid", "sft"], [1.0, 0.5]),
        (["ipo", "simpo"], [1.0, 2.0], ["ipo", "simpo", "sft"], [1.0, 2.0, 0.5]),
    ],
)
def test_rpo_alpha_becomes_weighted_sft_term(tmp_path, loss_type, weights, expected_types, expected_weights):
    keys = dict(model_name_or_path="m", dataset_name="d", loss_type=loss_type, rpo_alpha=0.5)
    if weights:
        keys["loss_weights"] = weights
    parsed = parse_recipe(["--config", write_recipe(tmp_path, **keys), *CPU])
    assert parsed.training_args.loss_type == expected_types
    assert parsed.training_args.loss_weights == expected_weights


def test_rpo_alpha_on_command_line(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d")
    parsed = parse_recipe(["--config", path, "--rpo_alpha=1.0", *CPU])
    assert parsed.training_args.loss_type == ["sigmoid", "sft"]


def test_rpo_alpha_null_is_off(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", rpo_alpha=None)
    assert parse_recipe(["--config", path, *CPU]).training_args.loss_type == ["sigmoid"]


def test_rpo_alpha_with_sft_already_present_is_an_error(tmp_path):
    path = write_recipe(
        tmp_path,
        model_name_or_path="m",
        dataset_name="d",
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        rpo_alpha=0.5,
    )
    with pytest.raises(RecipeError, match="already contains 'sft'"):
        parse_recipe(["--config", path, *CPU])


def test_reference_free_sigmoid_is_probability(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", reference_free=True)
    assert parse_recipe(["--config", path, *CPU]).training_args.loss_type == ["probability"]


def test_reference_free_with_reference_loss_is_an_error(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", loss_type="ipo", reference_free=True)
    with pytest.raises(RecipeError, match=r"reference_free.*'ipo'.*simpo"):
        parse_recipe(["--config", path, *CPU])


def test_contradictory_renamed_keys_are_an_error(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", torch_dtype="bfloat16", dtype="float32")
    with pytest.raises(RecipeError, match="torch_dtype.*dtype"):
        parse_recipe(["--config", path, *CPU])


def test_old_dataset_mixer_is_rejected_with_replacement(tmp_path):
    path = write_recipe(
        tmp_path,
        model_name_or_path="m",
        dataset_mixer={"org/prefs": 0.5},
        dataset_splits=["train_prefs", "test_prefs"],
    )
    with pytest.raises(RecipeError, match=r"dataset_mixture.*id: org/prefs, split: train_prefs.*weight: 0.5"):
        parse_recipe(["--config", path, *CPU])


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_recipe_key_is_named_with_suggestion(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", lerning_rate=1e-5, betta=0.1)
    with pytest.raises(RecipeError, match=r"lerning_rate \(did you mean learning_rate.*betta \(did you mean beta"):
        parse_recipe(["--config", path, *CPU])


def test_unknown_command_line_flag(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d")
    with pytest.raises(RecipeError, match="--bta"):
        parse_recipe(["--config", path, "--bta", "0.2", *CPU])


def test_two_dataset_sources_in_recipe(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", dataset_mixture={"datasets": []})
    with pytest.raises(RecipeError, match="alternative dataset sources"):
        parse_recipe(["--config", path, *CPU])


def test_invalid_loss_config_is_one_line(tmp_path, capsys):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", loss_type="nope")
    assert main(["dpo", "--config", path, *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trl-refpo dpo: error: Unknown loss_type ['nope']")
    assert not any("Traceback" in line for line in err)


def test_missing_model_path_is_one_line(tmp_path, tiny_jsonl, capsys):
    path = tiny_recipe(tmp_path, str(tmp_path / "no_such_model"), tiny_jsonl)
    assert main(["dpo", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"trl-refpo dpo: error: model_name_or_path {str(tmp_path / 'no_such_model')!r} does not exist (no such folder)."
    )


def test_zero_config_without_deepspeed_names_the_extra(tmp_path, monkeypatch, capsys, tiny_model_dir, tiny_jsonl):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a)
    )
    zero2 = Path(__file__).parents[2] / "examples" / "accelerate_configs" / "zero2.yaml"
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_jsonl)
    assert main(["dpo", "--config", path, "--accelerate_config", str(zero2), "--num_processes", "2"]) == 2
    assert 'pip install "trl-refpo[deepspeed]"' in capsys.readouterr().err
    # The same check inside a process started by `accelerate launch` with a ZeRO config:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["dpo", "--config", path]) == 2
    assert 'pip install "trl-refpo[deepspeed]"' in capsys.readouterr().err


@pytest.mark.parametrize(
    "keys, needs",
    [
        (dict(attn_implementation="flash_attention_2"), {"attn_implementation: flash_attention_2": "flash-attn"}),
        (dict(use_liger_kernel=True), {"use_liger_kernel: true": "liger-kernel"}),
        (dict(load_in_4bit=True, use_peft=True), {"load_in_4bit: true": "bitsandbytes"}),
        (dict(optim="paged_adamw_32bit"), {"optim: paged_adamw_32bit": "bitsandbytes"}),
        (dict(optim="adamw_torch", attn_implementation="sdpa"), {}),
    ],
)
def test_settings_name_the_package_they_need(tmp_path, keys, needs):
    parsed = parse_recipe(["--config", write_recipe(tmp_path, model_name_or_path="m", dataset_name="d", **keys), *CPU])
    assert required_packages(parsed.training_args, parsed.model_args) == needs


def test_launch_options_are_separated(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d")
    parsed = parse_recipe(
        ["--config", path, "--num_processes", "2", "--beta", "0.2", "--accelerate_config", "zero2", *CPU]
    )
    assert parsed.launch_args == ["--num_processes", "2", "--accelerate_config", "zero2"]
    assert parsed.script_argv == ["--config", path, "--beta", "0.2", *CPU]


# ------------------------------------------------------------------------------------------ end to end
def test_end_to_end_recipe_run(tmp_path, tiny_model_dir, tiny_jsonl):
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        tiny_jsonl,
        loss_type="alpha_dpo",
        alpha=0.2,
        beta=2.0,
        max_prompt_length=4,
        max_completion_length=3,
    )
    trainer = run_dpo(parse_recipe(["--config", path]))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
    assert trainer.objectives[0].controller.sigma > 0  # α-DPO statistics moved
    dataset = trainer.train_dataset
    assert max(len(ids) for ids in dataset["prompt_ids"]) == 4  # legacy max_prompt_length applied (last tokens)
    assert max(len(ids) for ids in dataset["chosen_ids"]) <= 3
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_console_main_trains(tmp_path, tiny_model_dir, tiny_jsonl):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_jsonl, max_steps=1)
    assert main(["dpo", "--config", path, "--loss_type", "sigmoid", "--rpo_alpha", "0.5"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_abbreviated_flag_is_refused(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path="m", dataset_name="d")
    with pytest.raises(RecipeError) as error:
        parse_recipe(["--config", path, "--learning_rat", "1e-6", *CPU])
    assert str(error.value) == "Unknown command-line argument(s): --learning_rat (did you mean learning_rate?)."
    assert parse_recipe(["--config", path, "--learning_rate", "1e-6", *CPU]).training_args.learning_rate == 1e-6


@pytest.mark.parametrize(
    "flag, expected",
    [
        (["--dataset_name", "./my_prefs.jsonl"], "dataset_name './my_prefs.jsonl': no such file or folder."),
        (["--dataset_name", "my_prefs.jsonl"], "dataset_name 'my_prefs.jsonl': no such file or folder."),
        (["--dataset_name", "/no/such/prefs"], "dataset_name '/no/such/prefs': no such file or folder."),
    ],
)
def test_missing_local_dataset_is_no_such_file(tmp_path, tiny_model_dir, tiny_jsonl, capsys, flag, expected):
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_jsonl)
    assert main(["dpo", "--config", path, *flag]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "trl-refpo dpo: error: " + expected


def test_missing_mixture_file_is_no_such_file(tmp_path, tiny_model_dir, tiny_jsonl, capsys):
    missing_file = str(tmp_path / "gone.jsonl")
    path = tiny_recipe(tmp_path, tiny_model_dir, tiny_jsonl, dataset_mixture={"datasets": [{"id": missing_file}]})
    assert main(["dpo", "--config", path]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"trl-refpo dpo: error: dataset_mixture id {missing_file!r}: no such file or folder."
    )


def test_final_evaluation_runs_once_and_card_names_the_local_model(tmp_path, tiny_model_dir, tiny_jsonl):
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        tiny_jsonl,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        dataset_mixture={"datasets": [{"id": tiny_jsonl}], "seed": 0, "test_split_size": 8},
    )
    trainer = run_dpo(parse_recipe(["--config", path]))
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2]  # the step-2 evaluation, not a second identical one
    eval_results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert eval_results["eval_loss"] == evaluations[0]["eval_loss"] and eval_results["eval_samples"] == 8
    card = (tmp_path / "out" / "README.md").read_text()
    assert "huggingface.co/None" not in card and 'model="None"' not in card
    assert f"This model is a fine-tuned version of the local model `{tiny_model_dir}`." in card
    assert f'generator = pipeline("text-generation", model="{tmp_path / "out"}", device_map="auto")' in card


def test_evaluation_off_the_last_step_still_runs_at_the_end(tmp_path, tiny_model_dir, tiny_jsonl):
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        tiny_jsonl,
        eval_strategy="steps",
        eval_steps=100,
        per_device_eval_batch_size=4,
        dataset_mixture={"datasets": [{"id": tiny_jsonl}], "seed": 0, "test_split_size": 8},
    )
    trainer = run_dpo(parse_recipe(["--config", path]))
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [2]


def test_project_triggered_checkpointing_warnings_are_silenced(tmp_path, tiny_model_dir, tiny_jsonl):
    with warnings.catch_warnings(record=True) as control:
        warnings.simplefilter("always")
        RefPOConfig(output_dir=str(tmp_path / "control"), use_cpu=True, bf16=False)
    assert (
        "`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` "
        "instead." in [str(warning.message) for warning in control]
    )  # TRL's default triggers it
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        tiny_jsonl,
        gradient_checkpointing=True,
        max_steps=1,
        loss_type="alpha_dpo",
        alpha=0.2,
        beta=2.0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["dpo", "--config", path]) == 0
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []


def test_deepspeed_cpu_line_is_dropped_and_other_lines_kept():
    silence_project_triggered_warnings()
    logger = logging.getLogger("DeepSpeed")
    line = logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 0, DEEPSPEED_CPU_LINE, None, None)
    other = logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 0, "Setting accelerator to CUDA", None, None)
    assert (logger.filter(line), logger.filter(other)) == (False, True)


def test_every_recipe_writes_under_an_ignored_folder():
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for recipe in RECIPES:
        output_dir = yaml.safe_load(recipe.read_text())["output_dir"]
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", output_dir + "/x"])
        assert ignored.returncode == 0, f"{recipe.name}: output_dir {output_dir} is not git-ignored"


def test_cpu_quickstart_recipe_runs_as_is_offline():
    recipe = yaml.safe_load((ROOT / "examples" / "recipes" / "cpu_quickstart.yaml").read_text())
    assert recipe["model_name_or_path"] == "offline:smollm2-135m-instruct" and recipe["bf16"] is False
    assert recipe["use_cpu"] is True
    rows = [
        json.loads(line) for line in (ROOT / recipe["dataset_mixture"]["datasets"][0]["id"]).read_text().splitlines()
    ]
    assert len(rows) == 64 and {"prompt", "chosen", "rejected"} == set(rows[0])
    assert recipe["dataset_mixture"]["test_split_size"] == 8


# ------------------------------------------------------------------------------------------ the CLI as users run it
# Each case runs `python -m trl_refpo.cli dpo` (or `accelerate launch` of it) in a fresh process, as a user would; the
# runs share one thread pool so the suite waits for the slowest, not the sum.
ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = ROOT / "examples" / "accelerate_configs"
ERROR_PREFIX = "trl-refpo dpo: error: "
NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU launch checks")


def cli_command(recipe: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "trl_refpo.cli", "dpo", "--config", recipe, *args]


def accelerate_command(config: str, recipe: str, processes: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        *cli_command(recipe)[1:],
    ]


def run_process(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("TRL_REFPO_DEBUG", None)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


# name: (recipe keys given the fixture folders, extra CLI args / "launch" config, expected error line start, run it?)
ONE_LINE_CASES = {
    "different_tokenizer_without_ref_tokenizer": (
        lambda d: dict(ref_model_name_or_path=d["ref"]),
        (),
        "The reference model's tokenizer (",
        True,
    ),
    "missing_ref_model_folder": (
        lambda d: dict(ref_model_name_or_path=d["tmp"] + "/no_ref"),
        (),
        "ref_model_name_or_path '{tmp}/no_ref' does not exist (no such folder).",
        True,
    ),
    "missing_ref_model_name": (
        lambda d: dict(ref_model_name_or_path="nobody/no-such-model"),
        (),
        "ref_model_name_or_path 'nobody/no-such-model' does not exist: no local folder",
        True,
    ),
    "missing_ref_tokenizer": (
        lambda d: dict(ref_model_name_or_path=d["ref"], ref_tokenizer_name_or_path=d["tmp"] + "/no_tok"),
        (),
        "ref_tokenizer_name_or_path '{tmp}/no_tok' does not exist (no such folder).",
        True,
    ),
    "dataset_without_chosen": (
        lambda d: dict(dataset_mixture={"datasets": [{"id": d["unlabelled"], "split": "train"}]}),
        (),
        "Dataset '{unlabelled}' (split 'train') has no column(s) ['chosen', 'rejected'] (it has ['prompt', 'good', "
        "'bad'])",
        True,
    ),
    "beta_not_a_number": (lambda d: dict(beta="high"), (), "beta: invalid float value: 'high'", True),
    "eval_strategy_value_not_enum": (
        lambda d: dict(eval_strategy="steps", eval_steps=1),
        (),
        "eval_strategy is 'steps' but the dataset has no split 'test'",
        True,
    ),
    "packages_not_installed": (
        lambda d: dict(
            attn_implementation="flash_attention_2",
            use_liger_kernel=True,
            load_in_4bit=True,
            use_peft=True,
            optim="paged_adamw_32bit",
        ),
        (),
        "`attn_implementation: flash_attention_2` needs the package 'flash-attn'; `use_liger_kernel: true` needs the "
        "package 'liger-kernel'; `load_in_4bit: true` needs the package 'bitsandbytes'; `optim: paged_adamw_32bit` "
        "needs the package 'bitsandbytes', not installed: pip install flash-attn liger-kernel bitsandbytes (or change "
        "those settings).",
        all(map(missing, ("flash_attn", "liger_kernel", "bitsandbytes"))),
    ),
    # More than one process: the trainer must see what the launcher started.
    "ddp_launch_on_cpu_without_use_cpu": (
        lambda d: dict(use_cpu=False),
        ("launch", "ddp.yaml"),
        "The launcher started 2 processes (WORLD_SIZE=2) but "
        "the trainer sees 1: each would train alone into the same output_dir; there is no GPU here: set `use_cpu: "
        "true`",
        not torch.cuda.is_available(),
    ),
    "zero2_launch_on_cpu": (
        lambda d: dict(use_cpu=False),
        ("launch", "zero2.yaml"),
        "DeepSpeed ZeRO needs CUDA GPUs here",
        not torch.cuda.is_available() and not missing("deepspeed"),
    ),
    "zero2_launch_with_use_cpu": (
        lambda d: dict(),
        ("launch", "zero2.yaml"),
        "`use_cpu: true` with a DeepSpeed (ZeRO) launch: accelerate would drop DeepSpeed",
        not missing("deepspeed"),
    ),
    "ddp_by_num_processes_without_use_cpu": (
        lambda d: dict(use_cpu=False),
        ("--accelerate_config", str(ACCELERATE_CONFIGS / "ddp.yaml"), "--num_processes", "2"),
        "2 processes with a multi-GPU launch",
        not torch.cuda.is_available(),
    ),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_model_dir, tiny_ref_dir, tiny_jsonl):
    """Every subprocess run of this module, started together (4 at a time): {name: CompletedProcess}."""
    base = tmp_path_factory.mktemp("cli_runs")
    unlabelled = base / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"prompt": "sort : b a :", "good": " a b", "bad": " b a"}) + "\n")
    folders = {"ref": tiny_ref_dir, "tmp": str(base), "unlabelled": str(unlabelled)}
    commands = {}
    for name, (keys, args, _, enabled) in ONE_LINE_CASES.items():
        if not enabled:
            continue
        folder = base / name
        folder.mkdir()
        recipe = tiny_recipe(folder, tiny_model_dir, tiny_jsonl, **keys(folders))
        commands[name] = accelerate_command(args[1], recipe) if args[:1] == ("launch",) else cli_command(recipe, *args)
    commands["debug_flag"] = cli_command(tiny_recipe(base, tiny_model_dir, tiny_jsonl, beta="high"), "--debug")

    # A run that trains: max_prompt_length with a cross-tokenizer reference, an eval split, the reference log-probs
    # precomputed once in this process and read from the cache by the CLI, whose log_level shows it.
    handbook = base / "handbook"
    handbook.mkdir()
    recipe = tiny_recipe(
        handbook,
        tiny_model_dir,
        tiny_jsonl,
        ref_model_name_or_path=tiny_ref_dir,
        ref_tokenizer_name_or_path=tiny_ref_dir,
        max_prompt_length=4,
        max_completion_length=3,
        precompute_ref_log_probs=True,
        ref_logps_cache_dir=str(handbook / "cache"),
        log_level="info",
        eval_strategy="steps",
        eval_steps=100,
        per_device_eval_batch_size=4,
        loss_type="alpha_dpo",
        beta=2.0,
        dataset_mixture={
            "datasets": [{"id": tiny_jsonl, "columns": ["prompt", "chosen", "rejected"]}],
            "seed": 0,
            "test_split_size": 8,
        },
    )
    run_dpo(parse_recipe(["--config", recipe, "--output_dir", str(handbook / "first")]))
    commands["handbook_outputs"] = cli_command(recipe)
    (base / "ddp").mkdir()
    commands["ddp_two_cpu_processes"] = accelerate_command(
        "ddp.yaml",
        tiny_recipe(base / "ddp", tiny_model_dir, tiny_jsonl, log_level="info", per_device_train_batch_size=2),
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_process, command) for name, command in commands.items()}
        runs = {name: future.result() for name, future in futures.items()}
    runs["_folders"] = {**folders, "handbook": handbook, "ddp_out": base / "ddp" / "out"}
    return runs


@pytest.mark.parametrize("case", list(ONE_LINE_CASES))
def test_cli_setup_error_is_one_line(cli_runs, case):
    if case not in cli_runs:
        pytest.skip("not applicable here (a GPU, or the optional package, is present)")
    run = cli_runs[case]
    expected = ONE_LINE_CASES[case][2].format(**cli_runs["_folders"])
    errors = [line for line in run.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1 and errors[0].startswith(ERROR_PREFIX + expected), run.stderr[-3000:]
    launched_by_accelerate = ONE_LINE_CASES[case][1][:1] == ("launch",)
    if launched_by_accelerate:  # accelerate's launcher reports the failed processes after our line
        assert run.returncode != 0
    else:
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert run.stderr.strip().splitlines()[-1] == errors[0]  # the last word, nothing after it


def test_cli_debug_flag_shows_the_traceback(cli_runs):
    run = cli_runs["debug_flag"]
    assert run.returncode != 0 and "Traceback" in run.stderr and "invalid float value: 'high'" in run.stderr


def test_cli_leaves_the_handbook_outputs(cli_runs):
    run = cli_runs["handbook_outputs"]
    assert run.returncode == 0, run.stderr[-3000:]
    # the library's own logger follows log_level: info; the reference log-probs came from the first run's cache
    assert "Loaded the reference log-probs of the train dataset from the cache" in run.stderr
    assert "Loaded the reference log-probs of the eval dataset from the cache" in run.stderr
    out = cli_runs["_folders"]["handbook"] / "out"
    results = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in ("train_results", "eval_results", "all_results", "trainer_state")
    }
    assert results["train_results"]["train_samples"] == 16 and results["eval_results"]["eval_samples"] == 8
    assert results["all_results"]["train_loss"] > 0 and results["all_results"]["eval_loss"] > 0  # both, merged
    assert results["trainer_state"]["global_step"] == 2
    card = (out / "README.md").read_text()
    assert "trl-refpo" in card and "alpha_dpo" in card and "prefs.jsonl" not in card  # no Hub link to a local file
    # Third-party lines the project triggers, which the user cannot act on, are not printed:
    assert "is deprecated and will be removed in v6" not in run.stderr
    assert "Setting accelerator to CPU" not in run.stdout + run.stderr
    assert (out / "model.safetensors").exists()


def test_cli_trains_on_two_cpu_processes(cli_runs):
    """The control of the launch checks: ddp.yaml + use_cpu: true trains ONE run over 2 processes."""
    run = cli_runs["ddp_two_cpu_processes"]
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert output.count("Total train batch size (w. parallel, distributed & accumulation) = 4") == 1, output[-3000:]
    state = json.loads((cli_runs["_folders"]["ddp_out"] / "trainer_state.json").read_text())
    assert state["global_step"] == 2
