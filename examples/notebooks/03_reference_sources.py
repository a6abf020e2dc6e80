# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reference policies: stronger, cross-tokenizer, prior, precomputed
#
# *Understanding Reference Policies in Direct Preference Optimization* (Liu et al., 2024) asks which reference DPO
# should pull towards. Its findings: a **stronger** reference helps when it is compatible with the policy (and then
# its best β is larger), and the reference can even be the **prior** `p(y)` of the completion without its prompt
# (the `likelihood` reward, Eq. 15).
#
# trl-refpo takes the reference log-probs from one source, chosen at construction:
#
# | you give | the reference is |
# |---|---|
# | nothing | the initial policy (TRL's default) |
# | `ref_model=` or `ref_model_name_or_path` | another checkpoint with the **same** tokenizer |
# | also `ref_tokenizer=` / `ref_tokenizer_name_or_path` | a checkpoint with a **different** tokenizer: it re-scores the original text |
# | `ref_prompt="none"` (default of `loss_type="likelihood"`) | the prior: the completion scored without its prompt |
# | dataset columns `ref_chosen_logps` / `ref_rejected_logps` | used as-is |
#
# and `precompute_ref_log_probs=True` + `ref_logps_cache_dir` scores the dataset once and caches it.
#
# Policy: SmolLM2-135M-Instruct (vocabulary 49 152). Cross-tokenizer reference: Gemma-3-270M (vocabulary 262 144).
# Data: the main job's rule-checked instructions. Every run: DPO (`sigmoid`), the same data, seed and steps.

# %%
# ── Parameters: edit this cell ─────────────────────────────────────────────────────────────────────────────
import os

from notebook_utils import SMALL_TEST_RUN, output_dir

MODEL = "offline:smollm2-135m-instruct"  # the policy, or a local model folder
REF_MODEL = "offline:gemma3-270m"         # the cross-tokenizer reference, or a local model folder
LEARNING_RATE = 2e-5
BATCH_SIZE = 4
MAX_STEPS = 8
SFT_STEPS = 6              # steps that make the "stronger" reference (SFT on the chosen replies)
NUM_TRAIN, NUM_EVAL = 32, 24
OUTPUT_DIR = output_dir("references")  # outputs/references

if SMALL_TEST_RUN:  # the tests (TRL_REFPO_NOTEBOOK_SMALL=1): tiny models built in code, a few steps
    MODEL, REF_MODEL, LEARNING_RATE, MAX_STEPS, SFT_STEPS, NUM_TRAIN, NUM_EVAL = "tiny", "tiny-bpe", 2e-3, 3, 3, 12, 6
MODEL = os.environ.get("TRL_REFPO_NOTEBOOK_MODEL", MODEL)  # the tests try a missing model

# %%
import logging

import matplotlib.pyplot as plt
import pandas as pd

from notebook_utils import constraint_data, load_model, save_figure, train_copy

model, tokenizer = load_model(MODEL)
_, _, train_dataset, eval_dataset = constraint_data(NUM_TRAIN, NUM_EVAL)
results = {}


def train(name, loss_type="sigmoid", beta=0.1, steps=None, train_now=True, **fields):
    """A DPO trainer on a copy of the initial policy. fields: DPOConfig fields, and `ref_model=` / `ref_tokenizer=`."""
    return train_copy(model, tokenizer, os.path.join(OUTPUT_DIR, name), train_dataset, eval_dataset,
                      max_steps=steps or MAX_STEPS, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE,
                      train=train_now, loss_type=loss_type, beta=beta, **fields)


def report(name, trainer):
    """Held-out metrics of a trained run, and the reference's own margin lp_ref(y_w) − lp_ref(y_l) on those pairs
    (recovered from the implicit rewards: reward = β·(lp_θ − lp_ref))."""
    metrics = trainer.evaluate()
    beta = trainer.args.beta
    policy_margin = metrics["eval_logps/chosen"] - metrics["eval_logps/rejected"]
    results[name] = {
        "rewards/accuracies": metrics["eval_rewards/accuracies"],
        "logps/accuracies": metrics["eval_logps/accuracies"],
        "policy margin lp(y_w) − lp(y_l)": policy_margin,
        "reference margin": policy_margin - metrics["eval_rewards/margins"] / beta,
        "loss": metrics["eval_loss"],
    }
    print(f"{name:<34} held-out rewards/accuracies {metrics['eval_rewards/accuracies']:.3f}  "
          f"logps/accuracies {metrics['eval_logps/accuracies']:.3f}  "
          f"reference margin {results[name]['reference margin']:+.2f}")


report("initial policy (β 0.1)", train("initial"))

# %% [markdown]
# ## 1. A stronger reference with the same tokenizer
#
# We make a "stronger" model by fine-tuning the initial policy on the chosen replies (TRL's `sft` loss type,
# through the same trainer), save it, and use it as the reference by path (`ref_model_name_or_path`; an in-memory
# model works too: `DPOTrainer(..., ref_model=stronger)`). The tokenizer saved with it is checked against the
# policy's. The paper's advice: with a stronger compatible reference, a larger β works better — we train with
# β = 0.1 and β = 1.

# %%
sft = train("sft_reference", loss_type="sft", steps=SFT_STEPS)
stronger_path = os.path.join(OUTPUT_DIR, "stronger_reference")
sft.save_model(stronger_path)
stronger = sft.evaluate()
del sft
initial_margin = results["initial policy (β 0.1)"]["reference margin"]  # that run's reference is the initial policy
print(f"held-out margin lp(y_w) − lp(y_l): initial policy {initial_margin:+.2f}, "
      f"SFT model {stronger['eval_logps/chosen'] - stronger['eval_logps/rejected']:+.2f}")

for beta in (0.1, 1.0):
    report(f"stronger reference (β {beta})", train(f"stronger_beta{beta}", beta=beta,
                                                    ref_model_name_or_path=stronger_path))

# %% [markdown]
# ## 2. A reference with a different tokenizer, precomputed and cached
#
# A reference whose tokenizer differs cannot score the policy's token ids. Passing its tokenizer (`ref_tokenizer=`,
# or `ref_tokenizer_name_or_path`) makes it re-score the **original text** of each prompt and completion, tokenised
# its own way (its BOS, its EOS, its chat template for conversational data); `lp_ref` sums its own completion
# tokens.
#
# `precompute_ref_log_probs=True` scores the whole dataset with that source before training and stores
# `ref_chosen_logps` / `ref_rejected_logps` (float32) and the reference's token counts as columns;
# `ref_logps_cache_dir` keeps them on disk, keyed by the scored tokens' content, the reference weights and tokenizer,
# the prompt mode and the truncation settings. A second trainer with the same key loads the file — no reference
# forward — and logs it.

# %%
import shutil
import time

logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("trl_refpo").setLevel(logging.INFO)
ref_model, ref_tokenizer = load_model(REF_MODEL, seed=1, parameter="REF_MODEL")
print(f"reference {type(ref_model).__name__}: vocabulary {len(ref_tokenizer):,} (the policy's: {len(tokenizer):,})")
cache_dir = os.path.join(OUTPUT_DIR, "ref_logps_cache")
shutil.rmtree(cache_dir, ignore_errors=True)  # start empty, so that the first construction scores
for attempt in ("first", "second"):
    start = time.perf_counter()
    cross = train("cross_tokenizer", ref_model=ref_model, ref_tokenizer=ref_tokenizer, train_now=False,
                  precompute_ref_log_probs=True, ref_logps_cache_dir=cache_dir)
    print(f"{attempt} construction: {time.perf_counter() - start:.1f}s; cache files: {sorted(os.listdir(cache_dir))}")

example = cross.train_dataset[0]
print("policy    completion tokens:", tokenizer.convert_ids_to_tokens(example["chosen_ids"]))
print("reference lp_ref(chosen), lp_ref(rejected), its chosen token count:",
      round(example["ref_chosen_logps"], 3), round(example["ref_rejected_logps"], 3), example["ref_chosen_lengths"])
cross.train()
report("Gemma-3 reference (cross-tokenizer)" if REF_MODEL.startswith("offline:") else "cross-tokenizer", cross)
del cross, ref_model

# %% [markdown]
# ## 3. The prior as reference
#
# `loss_type="likelihood"` is DPO against the prior `p_ref(y)`: the reference scores each completion with the prompt
# removed (Reference Policies Eq. 15; paper optimum β = 0.01). `ref_prompt="none"` gives the same prior to any
# reference-based loss, with any of the references above.

# %%
prior = train("likelihood", loss_type="likelihood", beta=0.01, train_now=False)
print("likelihood: ref_prompt =", prior.args.ref_prompt)
example = prior.train_dataset[0]
print("the reference scores:", tokenizer.decode(example["ref_prompt_ids"] + example["ref_chosen_ids"]))
prior.train()
report("prior (likelihood, β 0.01)", prior)
del prior

# %% [markdown]
# ## Held-out comparison
#
# The reference margin is the reference's own preference for the chosen reply; DPO rewards the policy for
# exceeding it, so a reference that already prefers the chosen replies (the SFT one) leaves less for the
# implicit reward to explain.

# %%
table = pd.DataFrame(results).T
figure, axes = plt.subplots(1, 2, figsize=(13, 3.8))
positions = range(len(table))
for offset, key in ((-0.2, "rewards/accuracies"), (0.2, "logps/accuracies")):
    axes[0].bar([p + offset for p in positions], table[key], width=0.4, label=key)
axes[0].set_ylabel("held-out accuracy")
axes[0].legend(fontsize=8)
for offset, key in ((-0.2, "policy margin lp(y_w) − lp(y_l)"), (0.2, "reference margin")):
    axes[1].bar([p + offset for p in positions], table[key], width=0.4, label=key)
axes[1].set_ylabel("held-out mean log-prob margin")
axes[1].legend(fontsize=8)
for axis in axes:
    axis.set_xticks(list(positions), table.index, rotation=20, ha="right", fontsize=8)
figure.tight_layout()
save_figure(figure, OUTPUT_DIR, "reference_sources.png")
table.round(3)
