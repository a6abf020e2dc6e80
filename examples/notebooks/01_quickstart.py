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
# # trl-refpo quickstart: three loss types on SmolLM2-135M-Instruct
#
# `trl_refpo.DPOTrainer` / `trl_refpo.DPOConfig` are subclasses of TRL's classes: change one import line of a TRL
# script and `loss_type` also accepts the objectives of recent papers on reference policies and KL control
# (`alpha_dpo`, `simpo`, `flex_dpo`, `beta_dpo`, `epsilon_dpo`, `probability`, `likelihood`, `typo`) next to every
# TRL loss type (`sigmoid`, `ipo`, `hinge`, `sft`, …).
#
# This notebook trains SmolLM2-135M-Instruct (converted offline from a PyPI package, `trl_refpo.research.offline_models`)
# on the main job's rule-checked instructions (`trl_refpo.research.constraint_tasks`: "reply with only the number",
# "at most 3 words", "lowercase only", "separated by commas", "end with the word …", "yes or no") with three loss
# types — TRL's `sigmoid` (DPO), `alpha_dpo` and `epsilon_dpo` — and measures on **held-out** prompts:
#
# * constraint satisfaction: the share of greedy replies that a rule accepts, before and after training;
# * `rewards/accuracies`: the implicit reward `β·(log π_θ − log π_ref)` ranks the chosen reply first;
# * `logps/accuracies`: the **policy itself** ranks it first, `log π_θ(y_w) > log π_θ(y_l)` (Table 2 of
#   *Understanding Reference Policies in DPO*).

# %%
# ── Parameters: edit this cell ─────────────────────────────────────────────────────────────────────────────
import os

from notebook_utils import SMALL_TEST_RUN, output_dir

MODEL = "offline:smollm2-135m-instruct"  # or a local model folder
LEARNING_RATE = 2e-5
BATCH_SIZE = 4             # preference pairs per optimizer step
MAX_STEPS = 16             # one epoch of NUM_TRAIN pairs; a step takes a few seconds on a CPU
NUM_TRAIN, NUM_EVAL = 64, 24
MAX_NEW_TOKENS = 24        # greedy reply length for the constraint check
LOSS_TYPES = {
    "sigmoid": dict(beta=0.1),  # TRL's DPO, TRL's own code
    "alpha_dpo": dict(beta=2.5, alpha=0.2, gamma_beta_ratio=0.6, ln=True),
    "epsilon_dpo": dict(beta=0.1, epsilon=0.01),
}
OUTPUT_DIR = output_dir("quickstart")  # outputs/quickstart

if SMALL_TEST_RUN:  # the tests (TRL_REFPO_NOTEBOOK_SMALL=1): tiny models built in code, a few steps
    MODEL, LEARNING_RATE, MAX_STEPS, NUM_TRAIN, NUM_EVAL, MAX_NEW_TOKENS = "tiny", 2e-3, 3, 12, 6, 4
MODEL = os.environ.get("TRL_REFPO_NOTEBOOK_MODEL", MODEL)  # the tests try a missing model

# %%
import matplotlib.pyplot as plt
import pandas as pd

from notebook_utils import constraint_data, constraint_satisfaction, load_model, logged, save_figure, train_copy
from trl_refpo.research.constraint_tasks import KINDS

model, tokenizer = load_model(MODEL)
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"vocabulary {len(tokenizer)}")
train_tasks, eval_tasks, train_dataset, eval_dataset = constraint_data(NUM_TRAIN, NUM_EVAL)
train_dataset[0]

# %% [markdown]
# ## Before training
#
# The initial policy's greedy replies to the held-out prompts, checked by the rules:

# %%
before_rates, before_replies = constraint_satisfaction(model, tokenizer, eval_tasks, MAX_NEW_TOKENS)
print(f"held-out constraint satisfaction before training: {before_rates['all']:.2f}")
pd.DataFrame({"kind": [task.kind for task in eval_tasks], "instruction": [task.instruction for task in eval_tasks],
              "reply": before_replies}).groupby("kind").head(1)

# %% [markdown]
# ## One function, any `loss_type`
#
# `train_copy` (in `notebook_utils.py`) builds `DPOTrainer(model=copy_of_the_policy, args=DPOConfig(...), ...)` with
# the fields every notebook shares (CPU, a log entry per step, no checkpoints) plus the loss-specific ones:
# `beta` for DPO; `beta`, `alpha`, `gamma_beta_ratio`, `ln` for α-DPO; `beta`, `epsilon` for ε-DPO. Every run
# starts from the same initial policy, which is also the reference (TRL's default).

# %%
runs = {}
for loss_type, fields in LOSS_TYPES.items():
    trainer = train_copy(model, tokenizer, os.path.join(OUTPUT_DIR, loss_type), train_dataset, eval_dataset,
                         max_steps=MAX_STEPS, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE, train=False,
                         loss_type=loss_type, **fields)
    before = trainer.evaluate()
    trainer.train()
    rates, replies = constraint_satisfaction(trainer.model, tokenizer, eval_tasks, MAX_NEW_TOKENS)
    runs[loss_type] = dict(history=trainer.state.log_history, before=before, after=trainer.evaluate(),
                           rates=rates, replies=replies)
    print(f"{loss_type}: held-out constraint satisfaction {before_rates['all']:.2f} → {rates['all']:.2f}")
    del trainer  # keep only the logs: every run holds a 135M model, its reference and its optimizer state

# %%
kinds = [*KINDS, "all"]
satisfaction = pd.DataFrame({"before": before_rates} | {name: run["rates"] for name, run in runs.items()}).loc[kinds]
print("held-out constraint satisfaction (share of greedy replies the rule accepts)")
satisfaction.round(2)

# %%
rows = []
for name, run in runs.items():
    for key in ("eval_logps/accuracies", "eval_rewards/accuracies", "eval_loss"):
        rows.append({"loss_type": name, "metric": key, "before": run["before"][key], "after": run["after"][key]})
pd.DataFrame(rows).pivot(index="loss_type", columns="metric", values=["before", "after"]).round(3)

# %% [markdown]
# DPO's implicit reward is `β·(log π_θ(y) − log π_ref(y))`. Before training the policy *is* the reference, every
# reward is 0 and `rewards/accuracies` of `sigmoid` and `epsilon_dpo` starts at 0 (ties do not count). α-DPO
# (like SimPO) rewards the length-normalised policy log-prob, so its `rewards/accuracies` starts where the initial
# policy's own ranking is. `logps/accuracies` means the same for every loss type.

# %%
figure, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 2]})
width = 0.8 / (len(runs) + 1)
for number, column in enumerate(satisfaction.columns):
    axes[0].bar([k + (number - len(runs) / 2) * width for k in range(len(kinds))], satisfaction[column], width,
                label=column, color="grey" if column == "before" else f"C{number - 1}")
axes[0].set_xticks(range(len(kinds)), kinds, rotation=15)
axes[0].set(ylim=(0, 1), ylabel="share satisfied", title=f"held-out constraint satisfaction ({NUM_EVAL} prompts)")
axes[0].legend(fontsize=8)
for number, (name, run) in enumerate(runs.items()):
    steps, chosen = logged(run["history"], "logps/chosen")
    rejected = logged(run["history"], "logps/rejected")[1]
    axes[1].plot(steps, [c - r for c, r in zip(chosen, rejected)], color=f"C{number}", label=name)
axes[1].set(xlabel="optimizer step", title="training batch: log π_θ(y_w) − log π_θ(y_l)")
axes[1].legend(fontsize=8)
figure.suptitle(f"SmolLM2-135M-Instruct, {MAX_STEPS} steps × {BATCH_SIZE} pairs, lr {LEARNING_RATE:g}"
                if MODEL.startswith("offline:") else f"{MODEL}, {MAX_STEPS} steps", fontsize=10)
figure.tight_layout()
save_figure(figure, OUTPUT_DIR, "constraint_satisfaction.png")

# %% [markdown]
# A few held-out prompts (one per kind), with the initial policy's reply and each trained policy's reply:

# %%
examples = pd.DataFrame({"kind": [task.kind for task in eval_tasks], "instruction": [t.instruction for t in eval_tasks],
                         "before": before_replies} | {name: run["replies"] for name, run in runs.items()})
with pd.option_context("display.max_colwidth", 60):
    display(examples.groupby("kind").head(1).set_index("kind"))
