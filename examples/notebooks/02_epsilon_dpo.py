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
# # ε-DPO: KL penalty control via perturbation
#
# *KL Penalty Control via Perturbation for Direct Preference Optimization* (Lee et al., 2025) adapts DPO's β
# **per pair**. For each pair it asks how the policy's log-ratio `s = log π_θ(y_w) − log π_θ(y_l)` would change if
# the policy had been trained with a weaker or a stronger KL penalty. Those two policies are estimated without
# training, by perturbing the logits towards or away from the reference at every completion position:
#
# * `h⁻ = (1 + ε)·h_θ − ε·h_ref` — as if trained with `β/(1+ε)` (weaker KL),
# * `h⁺ = (1 − ε)·h_θ + ε·h_ref` — as if trained with `β/(1−ε)` (stronger KL).
#
# With `s⁻`, `s⁺` the log-ratios under those logits: `step_i = +1` if `s⁻ > s > s⁺` (a weaker KL would separate
# the pair more: lower β), `−1` if `s⁺ > s > s⁻` (raise β), else 0. The pair is trained with
# `β_i = β / (1 + ε·step_i)`, and after every optimizer step the baseline moves: `β ← β / (1 + ε·mean(step))`.
#
# Config: `loss_type="epsilon_dpo"`, `epsilon` (ε, paper 0.01), `beta` (initial β). The reference must share the
# policy's vocabulary (the full next-token distributions are compared), so it cannot be precomputed or
# cross-tokenizer. Metrics: `epsilon_dpo/beta` (the baseline), `epsilon_dpo/beta_mean` (mean β_i of the batch),
# `epsilon_dpo/p_steps` / `n_steps` (the fractions of pairs with step +1 / −1). β is trainer state, saved with
# checkpoints.
#
# Policy and reference: SmolLM2-135M-Instruct; data: the main job's rule-checked instructions.

# %%
# ── Parameters: edit this cell ─────────────────────────────────────────────────────────────────────────────
import os

from notebook_utils import SMALL_TEST_RUN, output_dir

MODEL = "offline:smollm2-135m-instruct"  # or a local model folder
LEARNING_RATE = 2e-5
BATCH_SIZE = 4
MAX_STEPS = 12
NUM_TRAIN, NUM_EVAL = 48, 24
BETA = 0.1
EPSILONS = [0.01, 0.1]     # the paper's ε, and a larger one whose β moves visibly in a short run
WITH_DPO = True            # also train plain DPO (sigmoid) for comparison
OUTPUT_DIR = output_dir("epsilon_dpo")  # outputs/epsilon_dpo

if SMALL_TEST_RUN:  # the tests (TRL_REFPO_NOTEBOOK_SMALL=1): tiny models built in code, a few steps
    MODEL, LEARNING_RATE, MAX_STEPS, NUM_TRAIN, NUM_EVAL, WITH_DPO = "tiny", 2e-3, 4, 16, 6, True
MODEL = os.environ.get("TRL_REFPO_NOTEBOOK_MODEL", MODEL)  # the tests try a missing model

# %%
import matplotlib.pyplot as plt
import pandas as pd

from notebook_utils import constraint_data, load_model, logged, save_figure, train_copy

model, tokenizer = load_model(MODEL)
_, _, train_dataset, eval_dataset = constraint_data(NUM_TRAIN, NUM_EVAL)

runs = {}
for name, fields in [("DPO (sigmoid)", dict(loss_type="sigmoid"))] * WITH_DPO + [
    (f"ε-DPO, ε={epsilon}", dict(loss_type="epsilon_dpo", epsilon=epsilon)) for epsilon in EPSILONS
]:
    trainer = train_copy(model, tokenizer, os.path.join(OUTPUT_DIR, fields["loss_type"] + str(len(runs))),
                         train_dataset, eval_dataset, max_steps=MAX_STEPS, learning_rate=LEARNING_RATE,
                         batch_size=BATCH_SIZE, beta=BETA, **fields)
    runs[name] = dict(history=trainer.state.log_history, epsilon=fields.get("epsilon"), held_out=trainer.evaluate(),
                      color=f"C{EPSILONS.index(fields['epsilon']) + 1}" if "epsilon" in fields else "C0")
    del trainer
    print(f"{name}: trained {MAX_STEPS} steps")

# %%
eps_runs = {name: run for name, run in runs.items() if run["epsilon"] is not None}
figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for name, run in eps_runs.items():
    color = run["color"]
    axes[0].plot(*logged(run["history"], "epsilon_dpo/beta"), color=color, label=f"{name}: baseline β")
    axes[0].plot(*logged(run["history"], "epsilon_dpo/beta_mean"), "--", color=color, label=f"{name}: mean β_i")
    axes[1].plot(*logged(run["history"], "epsilon_dpo/p_steps"), color=color, label=f"{name}: step +1 (lower β)")
    axes[1].plot(*logged(run["history"], "epsilon_dpo/n_steps"), ":", color=color, label=f"{name}: step −1 (raise β)")
axes[0].axhline(BETA, color="grey", lw=0.8, label="DPO's fixed β")
axes[0].set_title("β trajectory")
axes[1].set_title("fraction of pairs per step direction")
for name, run in runs.items():
    axes[2].plot(*logged(run["history"], "loss"), color=run["color"], label=name)
axes[2].set_title("training loss")
for axis in axes:
    axis.set_xlabel("optimizer step")
    axis.legend(fontsize=7)
figure.suptitle(f"ε-DPO on {MODEL.removeprefix('offline:')}, {MAX_STEPS} steps × {BATCH_SIZE} pairs, "
                f"lr {LEARNING_RATE:g}", fontsize=10)
figure.tight_layout()
save_figure(figure, OUTPUT_DIR, "epsilon_dpo_beta.png")

# %% [markdown]
# At the first step the policy equals the reference, so `s⁻ = s = s⁺` and every step is 0. Then the baseline β
# follows the product of the per-step factors `1/(1 + ε·mean(step))`: when more pairs ask for a weaker KL (step +1)
# than for a stronger one, β falls. We check that on the logged values, then compare the held-out metrics (with
# DPO's when `WITH_DPO`).

# %%
for name, run in eps_runs.items():
    epsilon = run["epsilon"]
    _, betas = logged(run["history"], "epsilon_dpo/beta")  # logged during each step, before that step's update
    _, p_steps = logged(run["history"], "epsilon_dpo/p_steps")
    _, n_steps = logged(run["history"], "epsilon_dpo/n_steps")
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

keys = ["eval_loss", "eval_rewards/accuracies", "eval_logps/accuracies", "eval_rewards/margins",
        "eval_logps/chosen", "eval_logps/rejected"]
pd.DataFrame({name: {key.removeprefix("eval_"): run["held_out"][key] for key in keys} for name, run in runs.items()}
             ).T.round(3)
