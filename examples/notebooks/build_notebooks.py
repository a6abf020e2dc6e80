"""Writes the notebooks of this folder (without outputs) from the cell sources below.

    python examples/notebooks/build_notebooks.py          # rewrite every .ipynb
    python examples/notebooks/build_notebooks.py --check  # exit 1 if a committed notebook differs

Edit the notebooks HERE, then regenerate: the .ipynb files are build products kept in git so that they open
directly in Jupyter / on GitHub. ``tests/test_notebooks.py`` executes every notebook with small settings.

Every notebook starts with a parameter cell (``MODEL``, ``MAX_STEPS``, ``OUTPUT_DIR``, ...). The defaults
train tiny in-code models on the bundled toy task, offline, in well under a minute each on a CPU; put a
real model there (``"offline:smollm2-135m-instruct"`` or a local folder) for real runs. The tests set
``TRL_REFPO_NOTEBOOK_SMALL=1`` (a few steps) and ``TRL_REFPO_NOTEBOOK_OUTPUT_DIR`` (their own folder).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


def parameters(name: str, extra: str = "", small: str = "MAX_STEPS = 6") -> object:
    """The parameter cell every notebook starts with."""
    template = textwrap.dedent(
        f'''
        # ── Parameters: edit this cell ─────────────────────────────────────────────────────────────
        import os

        MODEL = "tiny"         # "tiny": random Llama built in code (offline, seconds) |
                               # "offline:smollm2-135m-instruct" | a local model folder
        LEARNING_RATE = 2e-3   # for the tiny model; use ~5e-7 to 5e-6 for a real one
        BATCH_SIZE = 16        # pairs per step; a real model on a CPU: 2 (about 15 s per step for 135M parameters)
        MAX_STEPS = 60
        OUTPUT_DIR = "outputs/{name}"
        {{extra}}

        # The tests run every notebook with a few steps (TRL_REFPO_NOTEBOOK_SMALL=1) and their own folders.
        if os.environ.get("TRL_REFPO_NOTEBOOK_SMALL"):
            {small}
        MODEL = os.environ.get("TRL_REFPO_NOTEBOOK_MODEL", MODEL)
        OUTPUT_DIR = os.path.join(os.environ.get("TRL_REFPO_NOTEBOOK_OUTPUT_DIR", ""), OUTPUT_DIR)
        '''
    )
    return code(template.replace("{extra}", textwrap.dedent(extra).strip()))


SETUP = '''
    import copy
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames, raised inside TRL
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

    os.environ.setdefault("TQDM_DISABLE", "1")
    import matplotlib.pyplot as plt
    import torch

    from trl_refpo import DPOConfig, DPOTrainer
    from trl_refpo.testing import toy_preference_dataset
    from notebook_utils import cpu_config, load_model, logged, output_path
'''

# --------------------------------------------------------------------------------------------- 01 quickstart
QUICKSTART = [
    md(
        """
        # trl-refpo quickstart

        `trl_refpo.DPOTrainer` / `trl_refpo.DPOConfig` are subclasses of TRL's classes: change one import
        line of a TRL script and `loss_type` also accepts the objectives of recent papers on reference
        policies and KL control (`alpha_dpo`, `simpo`, `flex_dpo`, `beta_dpo`, `epsilon_dpo`, `probability`,
        `likelihood`, `typo`) next to every TRL loss type (`sigmoid`, `ipo`, `hinge`, `sft`, …).

        This notebook trains the same tiny policy twice on a toy preference task — TRL's `sigmoid` (DPO) and
        trl-refpo's `alpha_dpo` — and compares the loss and the two ranking accuracies the trainer logs:

        * `rewards/accuracies`: the implicit reward `β·(log π_θ − log π_ref)` ranks the chosen answer first;
        * `logps/accuracies`: the **policy itself** ranks it first, `log π_θ(y_w) > log π_θ(y_l)` (the
          quantity of Table 2 of *Understanding Reference Policies in DPO*).
        """
    ),
    parameters("quickstart", extra="NUM_TRAIN = 256", small="MAX_STEPS, NUM_TRAIN = 6, 64"),
    code(
        SETUP
        + '''
    model, tokenizer = load_model(MODEL)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {num_parameters:,} parameters, vocabulary {len(tokenizer)}")

    # The toy task: sort / reverse / copy a few letters; `chosen` solves it, `rejected` does not.
    train_dataset = toy_preference_dataset(NUM_TRAIN, seed=0)
    eval_dataset = toy_preference_dataset(64, seed=1)
    train_dataset[0]
    '''
    ),
    md(
        """
        ## One function, any `loss_type`

        `cpu_config` (in `notebook_utils.py`) holds the fields every notebook shares (CPU, a log entry per
        step, no checkpoints). The loss-specific fields go straight into `DPOConfig`: `beta` for DPO;
        `beta`, `alpha`, `gamma_beta_ratio`, `ln` for α-DPO. Every run starts from a copy of the same initial
        policy, which is also the reference (TRL's default).
        """
    ),
    code(
        '''
    def train(loss_type, **fields):
        """Train a copy of the initial policy; return the trainer and the held-out metrics before / after."""
        args = DPOConfig(
            **cpu_config(os.path.join(OUTPUT_DIR, str(loss_type)), MAX_STEPS, LEARNING_RATE, BATCH_SIZE),
            loss_type=loss_type, **fields,
        )
        trainer = DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=tokenizer)
        before = trainer.evaluate()
        trainer.train()
        return trainer, before, trainer.evaluate()


    runs = {
        "sigmoid": train("sigmoid", beta=0.1),                         # TRL's DPO, TRL's own code
        "alpha_dpo": train("alpha_dpo", beta=2.5, alpha=0.2, gamma_beta_ratio=0.6, ln=True),
    }
    '''
    ),
    code(
        '''
    print("step " + "".join(f"{name:>12}" for name in runs))
    steps, _ = logged(runs["sigmoid"][0], "loss")
    losses = {name: logged(trainer, "loss")[1] for name, (trainer, _, _) in runs.items()}
    for row, step in enumerate(steps):
        if step % max(1, MAX_STEPS // 12) == 0 or step == 1:
            print(f"{step:>4} " + "".join(f"{losses[name][row]:>12.4f}" for name in runs))

    print("\\nheld-out accuracy          " + "".join(f"{name + ' before':>18}{'after':>8}" for name in runs))
    for key in ["eval_rewards/accuracies", "eval_logps/accuracies"]:
        print(f"{key:<27}" + "".join(f"{before[key]:>18.3f}{after[key]:>8.3f}" for _, before, after in runs.values()))
    '''
    ),
    md(
        """
        DPO's implicit reward is `β·(log π_θ(y) − log π_ref(y))`. Before training the policy *is* the
        reference, every reward is 0 and `sigmoid`'s `rewards/accuracies` starts at 0 (ties do not count).
        α-DPO (like SimPO) rewards the length-normalised policy log-prob `β·log π_θ(y)/|y|`, so its
        `rewards/accuracies` starts where the initial policy's own ranking is. `logps/accuracies` means the
        same for every loss type: does the policy itself rank the chosen answer first?
        """
    ),
    code(
        '''
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for name, (trainer, _, _) in runs.items():
        for axis, key in zip(axes, ["loss", "rewards/accuracies", "logps/accuracies"]):
            axis.plot(*logged(trainer, key), label=name)
            axis.set_title(key)
            axis.set_xlabel("step")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(output_path(OUTPUT_DIR, "quickstart.png"))
    '''
    ),
]

# --------------------------------------------------------------------------------------------- 02 epsilon-DPO
EPSILON_DPO = [
    md(
        """
        # ε-DPO: KL penalty control via perturbation

        *KL Penalty Control via Perturbation for Direct Preference Optimization* (Lee et al., 2025) adapts
        DPO's β **per pair**. For each pair it asks how the policy's log-ratio
        `s = log π_θ(y_w) − log π_θ(y_l)` would change if the policy had been trained with a weaker or a
        stronger KL penalty. Those two policies are estimated without training, by perturbing the logits
        towards or away from the reference at every completion position:

        * `h⁻ = (1 + ε)·h_θ − ε·h_ref` — as if trained with `β/(1+ε)` (weaker KL),
        * `h⁺ = (1 − ε)·h_θ + ε·h_ref` — as if trained with `β/(1−ε)` (stronger KL).

        With `s⁻`, `s⁺` the log-ratios under those logits: `step_i = +1` if `s⁻ > s > s⁺` (a weaker KL would
        separate the pair more: lower β), `−1` if `s⁺ > s > s⁻` (raise β), else 0. The pair is trained with
        `β_i = β / (1 + ε·step_i)`, and after every optimizer step the baseline moves:
        `β ← β / (1 + ε·mean(step))`.

        Config: `loss_type="epsilon_dpo"`, `epsilon` (ε, paper 0.01), `beta` (initial β, paper 0.01 for
        UltraFeedback). The reference must share the policy's vocabulary (the full next-token distributions
        are compared), so it cannot be precomputed or cross-tokenizer. Metrics: `epsilon_dpo/beta` (the
        baseline), `epsilon_dpo/beta_mean` (mean β_i of the batch), `epsilon_dpo/p_steps` / `n_steps` (the
        fractions of pairs with step +1 / −1). β is trainer state, saved with checkpoints.
        """
    ),
    parameters(
        "epsilon_dpo",
        extra="""
        BETA = 0.1
        EPSILONS = [0.01, 0.1]   # the paper's ε, and a larger one whose β moves visibly in a short run
        NUM_TRAIN = 256
        """,
        small="MAX_STEPS, NUM_TRAIN = 6, 96",
    ),
    code(
        SETUP
        + '''
    model, tokenizer = load_model(MODEL)
    train_dataset = toy_preference_dataset(NUM_TRAIN, seed=0)
    eval_dataset = toy_preference_dataset(64, seed=1)


    def train(name, loss_type, **fields):
        args = DPOConfig(**cpu_config(os.path.join(OUTPUT_DIR, name), MAX_STEPS, LEARNING_RATE, BATCH_SIZE),
                         loss_type=loss_type, beta=BETA, **fields)
        trainer = DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=tokenizer)
        trainer.train()
        return trainer


    runs = {"DPO (sigmoid)": train("sigmoid", "sigmoid")}
    for epsilon in EPSILONS:
        runs[f"ε-DPO, ε={epsilon}"] = train(f"epsilon_{epsilon}", "epsilon_dpo", epsilon=epsilon)
    '''
    ),
    code(
        '''
    eps_runs = {name: trainer for name, trainer in runs.items() if name.startswith("ε")}
    figure, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for number, (name, trainer) in enumerate(eps_runs.items(), start=1):  # one colour per run
        color = f"C{number}"
        axes[0].plot(*logged(trainer, "epsilon_dpo/beta"), color=color, label=f"{name}: baseline β")
        axes[0].plot(*logged(trainer, "epsilon_dpo/beta_mean"), "--", color=color, label=f"{name}: mean β_i")
        axes[1].plot(*logged(trainer, "epsilon_dpo/p_steps"), color=color, label=f"{name}: step +1 (lower β)")
        axes[1].plot(*logged(trainer, "epsilon_dpo/n_steps"), ":", color=color, label=f"{name}: step −1 (raise β)")
    axes[0].axhline(BETA, color="grey", lw=0.8, label="DPO's fixed β")
    axes[0].set_title("β trajectory")
    axes[1].set_title("fraction of pairs per step direction")
    for number, (name, trainer) in enumerate(runs.items()):
        axes[2].plot(*logged(trainer, "loss"), color=f"C{number}", label=name)
    axes[2].set_title("training loss")
    for axis in axes:
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_path(OUTPUT_DIR, "epsilon_dpo.png"))
    '''
    ),
    md(
        """
        At the first step the policy equals the reference, so `s⁻ = s = s⁺` and every step is 0. Then the
        baseline β follows the product of the per-step factors `1/(1 + ε·mean(step))`: when more pairs ask
        for a weaker KL (step +1) than for a stronger one, β falls. We check that on the logged values,
        then compare the held-out accuracies with DPO's.
        """
    ),
    code(
        '''
    for name, trainer in eps_runs.items():
        epsilon = trainer.args.epsilon
        _, betas = logged(trainer, "epsilon_dpo/beta")  # logged during each step, before that step's update
        _, p_steps = logged(trainer, "epsilon_dpo/p_steps")
        _, n_steps = logged(trainer, "epsilon_dpo/n_steps")
        # one logged batch = one optimizer step here, so mean(step) = p_steps − n_steps
        replayed = [BETA]
        for p, n in zip(p_steps[:-1], n_steps[:-1]):
            replayed.append(replayed[-1] / (1 + epsilon * (p - n)))
        worst = max(abs(b - r) / r for b, r in zip(betas, replayed))
        print(f"{name}: β {betas[0]:.6f} → {betas[-1]:.6f} over {len(betas)} steps; largest relative gap to "
              f"β ← β/(1 + ε·mean(step)) replayed from the logged fractions: {worst:.1e}; "
              f"mean fraction with step +1: {sum(p_steps) / len(p_steps):.2f}, "
              f"with step −1: {sum(n_steps) / len(n_steps):.2f}")
        assert worst < 1e-5

    print(f"\\n{'held-out':<20}{'loss':>8}{'rewards/acc':>13}{'logps/acc':>11}")
    for name, trainer in runs.items():
        metrics = trainer.evaluate()
        print(f"{name:<20}{metrics['eval_loss']:>8.4f}{metrics['eval_rewards/accuracies']:>13.3f}"
              f"{metrics['eval_logps/accuracies']:>11.3f}")
    '''
    ),
]

# --------------------------------------------------------------------------------------------- 03 references
REFERENCES = [
    md(
        """
        # Reference policies: stronger, cross-tokenizer, prior, precomputed

        *Understanding Reference Policies in Direct Preference Optimization* (Liu et al., 2024) asks which
        reference DPO should pull towards. Its findings: a **stronger** reference helps when it is
        compatible with the policy (and then its best β is larger), and the reference can even be the
        **prior** `p(y)` of the completion without its prompt (the `likelihood` reward, Eq. 15).

        trl-refpo takes the reference log-probs from one source, chosen at construction:

        | you give | the reference is |
        |---|---|
        | nothing | the initial policy (TRL's default) |
        | `ref_model=` or `ref_model_name_or_path` | another checkpoint with the **same** tokenizer |
        | also `ref_tokenizer=` / `ref_tokenizer_name_or_path` | a checkpoint with a **different** tokenizer: it re-scores the original text |
        | `ref_prompt="none"` (default of `loss_type="likelihood"`) | the prior: the completion scored without its prompt |
        | dataset columns `ref_chosen_logps` / `ref_rejected_logps` | used as-is |

        and `precompute_ref_log_probs=True` + `ref_logps_cache_dir` scores the dataset once and caches it.
        """
    ),
    parameters(
        "references",
        extra="""
        REF_MODEL = "tiny-bpe"   # the cross-tokenizer reference: "tiny-bpe" (a tiny Llama with a BPE tokenizer,
                                 # trained below) | "offline:gemma3-270m" | a local model folder
        SFT_STEPS = 40           # steps that make the "stronger" references (SFT on the chosen answers)
        NUM_TRAIN = 256
        """,
        small="MAX_STEPS, SFT_STEPS, NUM_TRAIN = 4, 4, 32",
    ),
    code(
        SETUP
        + '''
    model, tokenizer = load_model(MODEL)
    train_dataset = toy_preference_dataset(NUM_TRAIN, seed=0)
    eval_dataset = toy_preference_dataset(64, seed=1)


    def train(name, loss_type="sigmoid", beta=0.1, steps=None, policy=None, policy_tokenizer=None, train_now=True,
              **kwargs):
        """A trainer on a copy of `policy` (default: the initial policy); trained unless `train_now=False`.
        kwargs: DPOConfig fields, and the trainer's `ref_model=` / `ref_tokenizer=`."""
        trainer_kwargs = {key: kwargs.pop(key) for key in ("ref_model", "ref_tokenizer") if key in kwargs}
        args = DPOConfig(**cpu_config(os.path.join(OUTPUT_DIR, name), steps or MAX_STEPS,
                                      LEARNING_RATE, BATCH_SIZE), loss_type=loss_type, beta=beta, **kwargs)
        trainer = DPOTrainer(model=copy.deepcopy(policy or model), args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=policy_tokenizer or tokenizer,
                             **trainer_kwargs)
        if train_now:
            trainer.train()
        return trainer


    def report(name, trainer):
        metrics = trainer.evaluate()
        print(f"{name:<38} held-out rewards/accuracies {metrics['eval_rewards/accuracies']:.3f}  "
              f"logps/accuracies {metrics['eval_logps/accuracies']:.3f}")
        return metrics


    results = {"initial policy as reference": report("initial policy as reference", train("initial"))}
    '''
    ),
    md(
        """
        ## 1. A stronger reference with the same tokenizer

        We make a "stronger" model by fine-tuning the initial policy on the chosen answers (TRL's `sft` loss
        type, through the same trainer), save it, and use it as the reference by path
        (`ref_model_name_or_path`; an in-memory model works too: `DPOTrainer(..., ref_model=stronger)`).
        The tokenizer saved with it is checked against the policy's. The paper's advice: with a stronger
        compatible reference, a larger β works better — we train with β = 0.1 and β = 1.
        """
    ),
    code(
        '''
    sft = train("sft_reference", loss_type="sft", steps=SFT_STEPS)
    stronger_path = os.path.join(OUTPUT_DIR, "stronger_reference")
    sft.save_model(stronger_path)
    initial, stronger = results["initial policy as reference"], sft.evaluate()
    for key in ("eval_logps/chosen", "eval_logps/accuracies"):
        print(f"held-out {key}: initial policy {initial[key]:.3f}, stronger reference {stronger[key]:.3f}")

    for beta in (0.1, 1.0):
        name = f"stronger reference, beta={beta}"
        results[name] = report(name, train(f"stronger_beta{beta}", beta=beta, ref_model_name_or_path=stronger_path))
    '''
    ),
    md(
        """
        ## 2. A reference with a different tokenizer

        A reference whose tokenizer differs cannot score the policy's token ids. Passing its tokenizer
        (`ref_tokenizer=`, or `ref_tokenizer_name_or_path`) makes it re-score the **original text** of each
        prompt and completion, tokenised its own way (its BOS, its EOS, its chat template for conversational
        data); `lp_ref` sums its own completion tokens. Here the reference is a tiny Llama with a
        character-BPE tokenizer (`trl_refpo.testing.tiny_bpe_tokenizer`), first fine-tuned on the chosen
        answers with its own tokenizer.
        """
    ),
    code(
        '''
    ref_model, ref_tokenizer = load_model(REF_MODEL, seed=1, parameter="REF_MODEL")
    if REF_MODEL == "tiny-bpe":  # make the random BPE model a reference worth having
        # TRL warns (once per string) that BPE merges such as " f :" cross the prompt/completion boundary.
        logging.getLogger("trl.trainer.dpo_trainer").setLevel(logging.ERROR)
        ref_model = train("bpe_sft", loss_type="sft", steps=SFT_STEPS, policy=ref_model,
                          policy_tokenizer=ref_tokenizer).model

    cross = train("cross_tokenizer", ref_model=ref_model, ref_tokenizer=ref_tokenizer, train_now=False)
    example = cross.train_dataset[0]
    print("source:", type(cross.reference_source).__name__)
    print("policy    tokens:", tokenizer.convert_ids_to_tokens(example["prompt_ids"] + example["chosen_ids"]))
    print("reference tokens:",
          ref_tokenizer.convert_ids_to_tokens(example["ref_prompt_ids"] + example["ref_chosen_ids"]))
    cross.train()
    results["cross-tokenizer reference"] = report("cross-tokenizer reference", cross)
    '''
    ),
    md(
        """
        ## 3. The prior as reference

        `loss_type="likelihood"` is DPO against the prior `p_ref(y)`: the reference scores each completion
        with the prompt removed (Reference Policies Eq. 15; paper optimum β = 0.01). `ref_prompt="none"` gives
        the same prior to any reference-based loss, with any of the references above.
        """
    ),
    code(
        '''
    prior = train("likelihood", loss_type="likelihood", beta=0.01, train_now=False)
    print("likelihood: ref_prompt =", prior.args.ref_prompt)
    example = prior.train_dataset[0]
    print("the reference scores:",
          tokenizer.convert_ids_to_tokens(example["ref_prompt_ids"] + example["ref_chosen_ids"]))
    prior.train()
    results["prior (likelihood, beta=0.01)"] = report("prior (likelihood, beta=0.01)", prior)
    results["prior of the stronger reference"] = report(
        "prior of the stronger reference",
        train("stronger_prior", ref_model_name_or_path=stronger_path, ref_prompt="none"),
    )
    '''
    ),
    md(
        """
        ## 4. Precompute once, cache on disk

        `precompute_ref_log_probs=True` scores the whole dataset with the chosen source before training and
        stores `ref_chosen_logps` / `ref_rejected_logps` (float32) and the reference's token counts as
        columns; `ref_logps_cache_dir` keeps them on disk, keyed by the scored tokens' content, the reference
        weights and tokenizer, the prompt mode and the truncation settings. A second trainer with the same
        key loads the file — no reference forward — and logs it.
        """
    ),
    code(
        '''
    import shutil
    import time

    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("trl_refpo").setLevel(logging.INFO)
    cache_dir = os.path.join(OUTPUT_DIR, "ref_logps_cache")
    shutil.rmtree(cache_dir, ignore_errors=True)  # start empty, so that the first construction scores
    times = []
    for attempt in ("first", "second"):
        start = time.perf_counter()
        cached = train("precomputed", ref_model=ref_model, ref_tokenizer=ref_tokenizer, train_now=False,
                       precompute_ref_log_probs=True, ref_logps_cache_dir=cache_dir)
        times.append(time.perf_counter() - start)
        print(f"{attempt} construction: {times[-1]:.2f}s; cache files: {sorted(os.listdir(cache_dir))}")
    print(cached.train_dataset.select_columns(["ref_chosen_logps", "ref_rejected_logps", "ref_chosen_lengths"])[:3])
    cached.train()
    results["cross-tokenizer, precomputed"] = report("cross-tokenizer, precomputed + cached", cached)
    online_loss = results["cross-tokenizer reference"]["eval_loss"]
    precomputed_loss = results["cross-tokenizer, precomputed"]["eval_loss"]
    print(f"held-out loss, online vs precomputed reference: {online_loss:.5f} vs {precomputed_loss:.5f}")
    assert abs(online_loss - precomputed_loss) < 1e-3 * abs(online_loss)  # the same reference, scored once
    '''
    ),
    code(
        '''
    names = list(results)
    figure, axis = plt.subplots(figsize=(10, 3.8))
    positions = range(len(names))
    for offset, key in ((-0.2, "eval_rewards/accuracies"), (0.2, "eval_logps/accuracies")):
        axis.bar([p + offset for p in positions], [results[n][key] for n in names], width=0.4, label=key)
    axis.set_xticks(list(positions), names, rotation=20, ha="right")
    axis.set_ylabel("held-out accuracy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_path(OUTPUT_DIR, "references.png"))
    '''
    ),
]

# --------------------------------------------------------------------------------------------- 04 alpha vs simpo
ALPHA_SIMPO = [
    md(
        """
        # α-DPO vs SimPO

        **SimPO** drops the reference model and asks the length-normalised policy margin to exceed a fixed
        target: with `u = ln π_θ(y_w) − ln π_θ(y_l)` (log-probs divided by the completion lengths),
        `loss = −log σ(β·(u − γ/β))`.

        **α-DPO** (Wu et al., 2024) makes the target adaptive: with the reference's normalised margin
        `r = ln π_ref(y_w) − ln π_ref(y_l)` and `g = u − r`, it keeps running statistics `μ, σ` of `g`
        (momentum 0.9, updated on every training batch) and uses

        `margin = stopgrad(γ/β + α·(g − μ)/σ)`,  `loss = −log σ(β·(u − margin))`

        (the authors' code; the paper's Eq. 12 places α outside the β factor). Pairs where the policy has
        already moved far from the reference get a larger margin. `alpha = 0` is SimPO exactly.

        Config fields: `beta` (authors: 2.5), `gamma_beta_ratio` (γ/β, 0.6), `alpha` (0.2), `ln` (length
        normalisation, true). Metrics: `alpha_dpo/mu`, `alpha_dpo/sigma`, `alpha_dpo/margin_mean`.
        """
    ),
    parameters("alpha_dpo_vs_simpo", extra="NUM_TRAIN = 256", small="MAX_STEPS, NUM_TRAIN = 6, 96"),
    code(
        SETUP
        + '''
    model, tokenizer = load_model(MODEL)
    train_dataset = toy_preference_dataset(NUM_TRAIN, seed=0)
    eval_dataset = toy_preference_dataset(64, seed=1)
    SHARED = dict(beta=2.5, gamma_beta_ratio=0.6, ln=True)  # the same data, seed and β for every run


    def train(name, loss_type, **fields):
        args = DPOConfig(**cpu_config(os.path.join(OUTPUT_DIR, name), MAX_STEPS, LEARNING_RATE, BATCH_SIZE),
                         loss_type=loss_type, **SHARED, **fields)
        trainer = DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=tokenizer)
        trainer.train()
        return trainer


    runs = {
        "simpo": train("simpo", "simpo"),
        "alpha_dpo (alpha=0.2)": train("alpha_dpo", "alpha_dpo", alpha=0.2),
        "alpha_dpo (alpha=0)": train("alpha_dpo_0", "alpha_dpo", alpha=0.0),
    }
    '''
    ),
    md(
        """
        With `alpha = 0` α-DPO must reproduce SimPO step for step (it still loads the reference, whose
        margin then has no effect):
        """
    ),
    code(
        '''
    simpo_loss = logged(runs["simpo"], "loss")[1]
    alpha0_loss = logged(runs["alpha_dpo (alpha=0)"], "loss")[1]
    largest = max(abs(a - b) for a, b in zip(simpo_loss, alpha0_loss))
    print(f"largest loss difference, simpo vs alpha_dpo(alpha=0), over {len(simpo_loss)} steps: {largest}")
    assert all(abs(a - b) < 1e-4 * max(1.0, abs(a)) for a, b in zip(simpo_loss, alpha0_loss))
    '''
    ),
    code(
        '''
    alpha_run = runs["alpha_dpo (alpha=0.2)"]
    figure, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for key in ("alpha_dpo/mu", "alpha_dpo/sigma"):
        axes[0].plot(*logged(alpha_run, key), label=key)
    axes[0].set_title("running statistics of g = u − r")
    axes[1].plot(*logged(alpha_run, "alpha_dpo/margin_mean"), label="alpha_dpo (alpha=0.2)", color="tab:orange")
    axes[1].axhline(SHARED["gamma_beta_ratio"], label="simpo: γ/β, constant", color="tab:blue")
    for name, trainer in runs.items():
        if "alpha=0)" in name:  # identical to simpo
            continue
        axes[2].plot(*logged(trainer, "rewards/margins"), label=name)
        axes[3].plot(*logged(trainer, "logps/accuracies"), label=name)
    axes[1].set_title("target margin (mean over the batch)")
    axes[2].set_title("rewards/margins")
    axes[3].set_title("logps/accuracies (train)")
    for axis in axes:
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(output_path(OUTPUT_DIR, "alpha_dpo_vs_simpo.png"))
    '''
    ),
    code(
        '''
    print(f"{'held-out':<24}{'loss':>8}{'rewards/acc':>13}{'logps/acc':>11}")
    for name, trainer in runs.items():
        metrics = trainer.evaluate()
        print(f"{name:<24}{metrics['eval_loss']:>8.4f}{metrics['eval_rewards/accuracies']:>13.3f}"
              f"{metrics['eval_logps/accuracies']:>11.3f}")
    mu, sigma = (logged(alpha_run, key)[1][-1] for key in ("alpha_dpo/mu", "alpha_dpo/sigma"))
    print(f"final running μ = {mu:.4f}, σ = {sigma:.4f}")
    '''
    ),
    md(
        """
        SimPO's target margin is the constant γ/β = 0.6; α-DPO's moves with the batch: its mean stays near γ/β
        (z-scores average to about 0) while individual pairs get more or less. μ and σ are trainer state,
        saved in every checkpoint (`trl_refpo_state.json`) and restored on resume.
        """
    ),
]

# --------------------------------------------------------------------------------------------- 05 diagnostics
DIAGNOSTICS = [
    md(
        """
        # Diagnostics from the papers

        1. **Token-level log-probability difference** (*Understanding Reference Policies in DPO*, §4.3,
           Fig. 1–3): after DPO, per vocabulary token, the mean of `log π_θ − log π_ref` over its occurrences
           in the completions; the most down-weighted tokens; the EOS token's log-prob and its
           chosen-minus-rejected difference. `trl_refpo.diagnostics.token_level_analysis`, and
           `TokenLevelAnalysisCallback` to run it at every evaluation.
        2. **Gradient magnitudes** (*3D-properties of DPO*, §3): per step, `|∂loss/∂lp(y_w)|`,
           `|∂loss/∂lp(y_l)|` and their ratio, logged by the trainer as `grad/chosen_abs`,
           `grad/rejected_abs`, `grad/ratio` for every trl-refpo loss type. Flex-DPO (`flex_dpo`, separate
           `beta_chosen` β⁺ and `beta_rejected` β⁻) changes that ratio to β⁻/β⁺ at the start of training.
        3. **Ranking accuracies**: `rewards/accuracies` (implicit reward) next to `logps/accuracies` (the
           policy itself).
        """
    ),
    parameters(
        "diagnostics",
        extra="""
        MIN_COUNT = 20        # occurrences a token needs to be listed (the paper: 100)
        NUM_TRAIN, NUM_EVAL = 256, 64
        """,
        small="MAX_STEPS, NUM_TRAIN, NUM_EVAL = 4, 64, 32",
    ),
    code(
        SETUP
        + '''
    from IPython.display import Image, display

    from trl_refpo.diagnostics import TokenLevelAnalysisCallback, token_level_analysis

    model, tokenizer = load_model(MODEL)
    train_dataset = toy_preference_dataset(NUM_TRAIN, seed=0)
    eval_dataset = toy_preference_dataset(NUM_EVAL, seed=1)
    '''
    ),
    md(
        """
        ## Token-level analysis during and after DPO

        The callback copies the initial policy when training starts (its reference) and analyses the
        evaluation set at every evaluation: `<output_dir>/token_analysis/step-N.png` and `.csv`, plus
        `eval_token/...` metrics.
        """
    ),
    code(
        '''
    callback = TokenLevelAnalysisCallback(min_count=MIN_COUNT, max_examples=NUM_EVAL)
    args = DPOConfig(**cpu_config(os.path.join(OUTPUT_DIR, "dpo"), MAX_STEPS, LEARNING_RATE, BATCH_SIZE,
                                  eval_strategy="steps", eval_steps=max(1, MAX_STEPS // 2)),
                     loss_type="sigmoid", beta=0.1)
    reference = copy.deepcopy(model)
    dpo = DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                     processing_class=tokenizer, callbacks=[callback])
    dpo.train()
    for step, result in callback.results:
        top = result.top_downweighted
        print(f"step {step}: EOS log π_θ − log π_ref {result.eos['mean_logp_diff']:+.4f}, "
              f"EOS chosen − rejected {result.eos['policy_chosen_minus_rejected']:+.4f}, most down-weighted: "
              + (f"{top['token'][0]!r} ({top['mean_logp_diff'][0]:+.4f})" if len(top) else "none"))
    print(sorted(os.listdir(os.path.join(args.output_dir, "token_analysis"))))
    metrics = dpo.evaluate()  # the callback also adds eval_token/... entries to the evaluation metrics
    print({key: round(value, 4) for key, value in metrics.items() if "token/" in key})
    '''
    ),
    code(
        '''
    analysis = token_level_analysis(dpo.model, reference, eval_dataset, tokenizer, min_count=MIN_COUNT, top_k=8,
                                    figure_path=output_path(OUTPUT_DIR, "token_analysis.png"), title="after DPO")
    print(f"{analysis.num_examples} examples, {len(analysis.table)} distinct completion tokens")
    analysis.table.head(10)
    '''
    ),
    code(
        '''
    print("most down-weighted tokens (count ≥ MIN_COUNT):")
    print(analysis.top_downweighted[["token", "count", "mean_logp_diff"]].to_string(index=False))
    print("\\nEOS:", {key: round(value, 4) if isinstance(value, float) else value for key, value in analysis.eos.items()})
    display(Image(analysis.figure_path))
    '''
    ),
    md(
        """
        ## Gradient magnitudes: DPO vs Flex-DPO

        The 3D-properties paper observes that DPO's gradient on the rejected response is as large as on
        the chosen one (ratio 1 at the start) and that the rejected likelihood falls faster than the chosen
        one rises. Flex-DPO with β⁻ < β⁺ damps the rejected side; `[flex_dpo, sft]` with `loss_weights`
        adds the paper's SFT term (Eq. 6), which increases the chosen-side gradient.
        """
    ),
    code(
        '''
    def train(name, loss_type, **fields):
        args = DPOConfig(**cpu_config(os.path.join(OUTPUT_DIR, name), MAX_STEPS, LEARNING_RATE, BATCH_SIZE),
                         loss_type=loss_type, **fields)
        trainer = DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=train_dataset,
                             processing_class=tokenizer)
        trainer.train()
        return trainer


    runs = {
        "DPO (flex_dpo, β⁺ = β⁻ = 0.1)": train("flex_equal", "flex_dpo", beta=0.1),
        "Flex-DPO (β⁺ = 0.1, β⁻ = 0.02)": train("flex", "flex_dpo", beta_chosen=0.1, beta_rejected=0.02),
        "DPO + 0.5·SFT": train("dpo_sft", ["flex_dpo", "sft"], beta=0.1, loss_weights=[1.0, 0.5]),
    }
    figure, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for name, trainer in runs.items():
        for axis, key in zip(axes, ["grad/chosen_abs", "grad/rejected_abs", "grad/ratio", "logps/rejected"]):
            axis.plot(*logged(trainer, key), label=name)
            axis.set_title(key)
            axis.set_xlabel("step")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_path(OUTPUT_DIR, "gradient_magnitudes.png"))
    for name, trainer in runs.items():
        first = next(entry for entry in trainer.state.log_history if "grad/ratio" in entry)
        print(f"{name:<32} step-1 grad/ratio {first['grad/ratio']:.3f}")
    '''
    ),
    md(
        """
        At the first step the policy equals the reference, so every DPO logit is 0 and
        `|∂ℓ/∂lp(y_w)| = β⁺/2`, `|∂ℓ/∂lp(y_l)| = β⁻/2`: the ratio is exactly 1 for DPO and β⁻/β⁺ = 0.2 for
        Flex-DPO. The SFT term (the token-mean NLL of the chosen answers, weight γ = 0.5) adds γ·B/N_w to
        the chosen side (B pairs, N_w chosen tokens in the batch), so DPO + SFT starts below 1 too. Over
        training, compare `logps/rejected`: in the default 60-step tiny run plain DPO pushes it down
        (about −18 → −22), while with either remedy it does not fall.
        """
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_epsilon_dpo.ipynb": EPSILON_DPO,
    "03_reference_sources.ipynb": REFERENCES,
    "04_alpha_dpo_vs_simpo.ipynb": ALPHA_SIMPO,
    "05_diagnostics.ipynb": DIAGNOSTICS,
}


def build(cells) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    for number, cell in enumerate(notebook.cells):  # stable ids: regenerating gives identical files
        cell["id"] = f"cell-{number}"
    return notebook


def _contents(notebook) -> list[tuple[str, str, object]]:
    """What ``--check`` compares: cell types, sources and outputs (not nbformat's version-dependent layout)."""
    return [(cell.cell_type, cell.source, cell.get("outputs")) for cell in notebook.cells]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a notebook on disk differs")
    cli = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        notebook, path = build(cells), HERE / name
        if not cli.check:
            path.write_text(nbformat.writes(notebook) + "\n")
        elif not path.is_file() or _contents(nbformat.read(path, as_version=4)) != _contents(notebook):
            stale.append(name)
    if stale:
        print(f"out of date: {stale}; run python {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
