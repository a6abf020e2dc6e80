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
# # α-DPO vs SimPO
#
# **SimPO** drops the reference model and asks the length-normalised policy margin to exceed a fixed target: with
# `u = ln π_θ(y_w) − ln π_θ(y_l)` (log-probs divided by the completion lengths), `loss = −log σ(β·(u − γ/β))`.
#
# **α-DPO** (Wu et al., 2024) makes the target adaptive: with the reference's normalised margin
# `r = ln π_ref(y_w) − ln π_ref(y_l)` and `g = u − r`, it keeps running statistics `μ, σ` of `g` (momentum 0.9,
# updated on every training batch) and uses
#
# `margin = stopgrad(γ/β + α·(g − μ)/σ)`,  `loss = −log σ(β·(u − margin))`
#
# (the authors' code; the paper's Eq. 12 places α outside the β factor). Pairs where the policy has already moved
# far from the reference get a larger margin. `alpha = 0` is SimPO exactly.
#
# Config fields: `beta` (authors: 2.5), `gamma_beta_ratio` (γ/β, 0.6), `alpha` (0.2), `ln` (length normalisation,
# true). Metrics: `alpha_dpo/mu`, `alpha_dpo/sigma`, `alpha_dpo/margin_mean`.
#
# Policy (and α-DPO's reference): SmolLM2-135M-Instruct; data: the main job's rule-checked instructions.

# %%
# ── Parameters: edit this cell ─────────────────────────────────────────────────────────────────────────────
import os

from notebook_utils import SMALL_TEST_RUN, output_dir

MODEL = "offline:smollm2-135m-instruct"  # or a local model folder
LEARNING_RATE = 2e-5
BATCH_SIZE = 4
MAX_STEPS = 12
CHECK_STEPS = 3            # steps of the α = 0 run compared with SimPO
NUM_TRAIN, NUM_EVAL = 48, 24
OUTPUT_DIR = output_dir("alpha_dpo_vs_simpo")  # outputs/alpha_dpo_vs_simpo

if SMALL_TEST_RUN:  # the tests (TRL_REFPO_NOTEBOOK_SMALL=1): tiny models built in code, a few steps
    MODEL, LEARNING_RATE, MAX_STEPS, CHECK_STEPS, NUM_TRAIN, NUM_EVAL = "tiny", 2e-3, 4, 3, 16, 6
MODEL = os.environ.get("TRL_REFPO_NOTEBOOK_MODEL", MODEL)  # the tests try a missing model

# %%
import matplotlib.pyplot as plt
import pandas as pd

from notebook_utils import constraint_data, load_model, logged, save_figure, train_copy

model, tokenizer = load_model(MODEL)
_, _, train_dataset, eval_dataset = constraint_data(NUM_TRAIN, NUM_EVAL)
# the same data, seed, β and learning-rate schedule for every run (also the shorter α = 0 check)
SHARED = dict(beta=2.5, gamma_beta_ratio=0.6, ln=True, warmup_steps=MAX_STEPS // 8)

runs = {}
for name, loss_type, fields, steps in [
    ("simpo", "simpo", {}, MAX_STEPS),
    ("alpha_dpo (α 0.2)", "alpha_dpo", dict(alpha=0.2), MAX_STEPS),
    ("alpha_dpo (α 0)", "alpha_dpo", dict(alpha=0.0), CHECK_STEPS),
]:
    trainer = train_copy(model, tokenizer, os.path.join(OUTPUT_DIR, f"run{len(runs)}"), train_dataset, eval_dataset,
                         max_steps=steps, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE, loss_type=loss_type,
                         **SHARED, **fields)
    runs[name] = dict(history=trainer.state.log_history, held_out=trainer.evaluate())
    del trainer
    print(f"{name}: trained {steps} steps")

# %% [markdown]
# With `alpha = 0` α-DPO must reproduce SimPO step for step (it still loads the reference, whose margin then has no
# effect):

# %%
simpo_loss = logged(runs["simpo"]["history"], "loss")[1]
alpha0_loss = logged(runs["alpha_dpo (α 0)"]["history"], "loss")[1]
largest = max(abs(a - b) for a, b in zip(simpo_loss, alpha0_loss))
print(f"largest loss difference, simpo vs alpha_dpo(α 0), over the first {len(alpha0_loss)} steps: {largest:.2e}")
assert all(abs(a - b) < 1e-3 * max(1.0, abs(a)) for a, b in zip(simpo_loss, alpha0_loss))

# %%
alpha_run = runs["alpha_dpo (α 0.2)"]["history"]
figure, axes = plt.subplots(1, 4, figsize=(17, 3.6))
for key in ("alpha_dpo/mu", "alpha_dpo/sigma"):
    axes[0].plot(*logged(alpha_run, key), label=key)
axes[0].set_title("running statistics of g = u − r")
axes[1].plot(*logged(alpha_run, "alpha_dpo/margin_mean"), label="alpha_dpo (α 0.2)", color="tab:orange")
axes[1].axhline(SHARED["gamma_beta_ratio"], label="simpo: γ/β, constant", color="tab:blue")
for name in ("simpo", "alpha_dpo (α 0.2)"):
    axes[2].plot(*logged(runs[name]["history"], "rewards/margins"), label=name)
    axes[3].plot(*logged(runs[name]["history"], "logps/accuracies"), label=name)
axes[1].set_title("target margin (mean over the batch)")
axes[2].set_title("rewards/margins")
axes[3].set_title("logps/accuracies (training batches)")
for axis in axes:
    axis.set_xlabel("optimizer step")
    axis.legend(fontsize=8)
figure.suptitle(f"{MODEL.removeprefix('offline:')}, {MAX_STEPS} steps × {BATCH_SIZE} pairs, lr {LEARNING_RATE:g}, "
                f"β {SHARED['beta']}", fontsize=10)
figure.tight_layout()
save_figure(figure, OUTPUT_DIR, "alpha_dpo_margins.png")

# %%
keys = ["eval_loss", "eval_rewards/accuracies", "eval_logps/accuracies", "eval_rewards/margins",
        "eval_logps/chosen", "eval_logps/rejected"]
mu, sigma = (logged(alpha_run, key)[1][-1] for key in ("alpha_dpo/mu", "alpha_dpo/sigma"))
print(f"final running μ = {mu:.4f}, σ = {sigma:.4f}; held-out after training (the α 0 run: {CHECK_STEPS} steps):")
pd.DataFrame({name: {key.removeprefix("eval_"): run["held_out"][key] for key in keys} for name, run in runs.items()}
             ).T.round(3)

# %% [markdown]
# SimPO's target margin is the constant γ/β = 0.6; α-DPO's moves with the batch. While the policy keeps moving away
# from the reference, g runs ahead of its running mean μ (momentum 0.9), so the z-scores are mostly positive and the
# mean margin sits above γ/β — most in the first steps, where σ is still tiny. μ and σ are trainer state, saved in
# every checkpoint (`trl_refpo_state.json`) and restored on resume.
