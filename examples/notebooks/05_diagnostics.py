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
# # Diagnostics from the papers
#
# 1. **Token-level log-probability difference** (*Understanding Reference Policies in DPO*, §4.3, Fig. 1–3): after
#    DPO, per vocabulary token, the mean of `log π_θ − log π_ref` over its occurrences in the completions; the most
#    down-weighted tokens; the EOS token's log-prob and its chosen-minus-rejected difference.
#    `trl_refpo.research.token_analysis.token_level_analysis`, and `TokenLevelAnalysisCallback` to run it at every evaluation.
# 2. **Gradient magnitudes** (*3D-properties of DPO*, §3): per step, `|∂loss/∂lp(y_w)|`, `|∂loss/∂lp(y_l)|` and their
#    ratio, logged by the trainer as `grad/chosen_abs`, `grad/rejected_abs`, `grad/ratio` for every trl-refpo loss
#    type. Flex-DPO (`flex_dpo`, separate `beta_chosen` β⁺ and `beta_rejected` β⁻) changes that ratio to β⁻/β⁺ at
#    the start of training.
#
# Policy and reference: SmolLM2-135M-Instruct; data: the main job's rule-checked instructions.

# %%
# ── Parameters: edit this cell ─────────────────────────────────────────────────────────────────────────────
import os

from notebook_utils import SMALL_TEST_RUN, output_dir

MODEL = "offline:smollm2-135m-instruct"  # or a local model folder
LEARNING_RATE = 2e-5
BATCH_SIZE = 4
MAX_STEPS = 12             # the DPO run analysed token by token
GRADIENT_STEPS = 6         # each run of the gradient-magnitude comparison
NUM_TRAIN, NUM_EVAL = 48, 32
MIN_COUNT = 10             # occurrences a token needs to be listed (the paper: 100, on far more data)
OUTPUT_DIR = output_dir("diagnostics")  # outputs/diagnostics

if SMALL_TEST_RUN:  # the tests (TRL_REFPO_NOTEBOOK_SMALL=1): tiny models built in code, a few steps
    MODEL, LEARNING_RATE, MAX_STEPS, GRADIENT_STEPS, NUM_TRAIN, NUM_EVAL = "tiny", 2e-3, 4, 3, 16, 12
MODEL = os.environ.get("TRL_REFPO_NOTEBOOK_MODEL", MODEL)  # the tests try a missing model

# %%
import matplotlib.pyplot as plt
import pandas as pd

from notebook_utils import constraint_data, load_model, logged, output_path, save_figure, train_copy
from trl_refpo.research.token_analysis import TokenLevelAnalysisCallback, token_level_analysis

model, tokenizer = load_model(MODEL)
_, _, train_dataset, eval_dataset = constraint_data(NUM_TRAIN, NUM_EVAL)

# %% [markdown]
# ## Token-level analysis during and after DPO
#
# The callback copies the initial policy when training starts (its reference) and analyses the evaluation set at
# every evaluation: `<output_dir>/token_analysis/step-N.png` and `.csv`, plus `eval_token/...` metrics.

# %%
callback = TokenLevelAnalysisCallback(min_count=MIN_COUNT, max_examples=NUM_EVAL)
dpo = train_copy(model, tokenizer, os.path.join(OUTPUT_DIR, "dpo"), train_dataset, eval_dataset,
                 max_steps=MAX_STEPS, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE, callbacks=[callback],
                 loss_type="sigmoid", beta=0.1, eval_strategy="steps", eval_steps=max(1, MAX_STEPS // 3))
during = pd.DataFrame([
    {"step": step, "EOS log π_θ − log π_ref": result.eos["mean_logp_diff"],
     "EOS lp(y_w) − lp(y_l)": result.eos["policy_chosen_minus_rejected"],
     "most down-weighted": result.top_downweighted["token"][0] if len(result.top_downweighted) else None,
     "its mean diff": result.top_downweighted["mean_logp_diff"][0] if len(result.top_downweighted) else None}
    for step, result in callback.results
])
print(sorted(os.listdir(os.path.join(dpo.args.output_dir, "token_analysis"))))
during.round(4)

# %% [markdown]
# After training, the same analysis against the initial policy (kept here as an explicit reference):

# %%
analysis = token_level_analysis(dpo.model, callback.ref_model, eval_dataset, tokenizer, min_count=MIN_COUNT, top_k=10,
                                figure_path=output_path(OUTPUT_DIR, "token_analysis.png"), title="after DPO")
print(f"{analysis.num_examples} held-out pairs, {len(analysis.table)} distinct completion tokens; EOS:",
      {key: round(value, 4) if isinstance(value, float) else value for key, value in analysis.eos.items()})
print(f"most down-weighted tokens (count ≥ {MIN_COUNT}):")
analysis.top_downweighted[["token", "count", "mean_logp_diff", "mean_policy_logp", "mean_ref_logp"]].round(3)

# %%
figure, axes = plt.subplots(1, 3, figsize=(16, 3.8), gridspec_kw={"width_ratios": [2, 2, 1.5]})
axes[0].hist(analysis.table["mean_logp_diff"], bins=40, color="tab:blue")
axes[0].set(xlabel="mean log π_θ − log π_ref per token", ylabel="vocabulary tokens", yscale="log",
            title=f"{len(analysis.table)} completion tokens, after {MAX_STEPS} DPO steps")
top = analysis.top_downweighted
axes[1].barh([repr(token) for token in top["token"]][::-1], top["mean_logp_diff"].tolist()[::-1], color="tab:red")
axes[1].set(xlabel="mean log π_θ − log π_ref", title=f"most down-weighted tokens (≥ {MIN_COUNT} occurrences)")
axes[2].plot(during["step"], during["EOS log π_θ − log π_ref"], marker="o", label="EOS: log π_θ − log π_ref")
axes[2].plot(during["step"], during["EOS lp(y_w) − lp(y_l)"], marker="s", label="EOS: chosen − rejected")
axes[2].set(xlabel="optimizer step", title="EOS during training (held-out)")
axes[2].legend(fontsize=8)
figure.suptitle(f"Token-level analysis, DPO (β 0.1) on {MODEL.removeprefix('offline:')}, {NUM_EVAL} held-out pairs",
                fontsize=10)
figure.tight_layout()
save_figure(figure, OUTPUT_DIR, "token_logprob_analysis.png")
del dpo

# %% [markdown]
# ## Gradient magnitudes: DPO vs Flex-DPO
#
# The 3D-properties paper observes that DPO's gradient on the rejected response is as large as on the chosen one
# (ratio 1 at the start) and that the rejected likelihood falls faster than the chosen one rises. Flex-DPO with
# β⁻ < β⁺ damps the rejected side; `[flex_dpo, sft]` with `loss_weights` adds the paper's SFT term (Eq. 6), which
# increases the chosen-side gradient.

# %%
runs = {}
for name, fields in {
    "DPO (flex_dpo, β⁺ = β⁻ = 0.1)": dict(loss_type="flex_dpo", beta=0.1),
    "Flex-DPO (β⁺ = 0.1, β⁻ = 0.02)": dict(loss_type="flex_dpo", beta_chosen=0.1, beta_rejected=0.02),
    "DPO + 0.5·SFT": dict(loss_type=["flex_dpo", "sft"], beta=0.1, loss_weights=[1.0, 0.5]),
}.items():
    trainer = train_copy(model, tokenizer, os.path.join(OUTPUT_DIR, f"gradients{len(runs)}"), train_dataset,
                         max_steps=GRADIENT_STEPS, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE, **fields)
    runs[name] = trainer.state.log_history
    del trainer

figure, axes = plt.subplots(1, 4, figsize=(17, 3.6))
for name, history in runs.items():
    for axis, key in zip(axes, ["grad/chosen_abs", "grad/rejected_abs", "grad/ratio", "logps/rejected"]):
        axis.plot(*logged(history, key), label=name)
        axis.set(title=key, xlabel="optimizer step")
axes[0].legend(fontsize=8)
figure.tight_layout()
save_figure(figure, OUTPUT_DIR, "gradient_magnitudes.png")
pd.DataFrame({name: {f"step-1 {key}": logged(history, key)[1][0] for key in ("grad/chosen_abs", "grad/rejected_abs",
                                                                              "grad/ratio")}
              | {"last logps/chosen": logged(history, "logps/chosen")[1][-1],
                 "last logps/rejected": logged(history, "logps/rejected")[1][-1]}
              for name, history in runs.items()}).T.round(4)

# %% [markdown]
# At the first step the policy equals the reference, so every DPO logit is 0 and `|∂ℓ/∂lp(y_w)| = β⁺/2`,
# `|∂ℓ/∂lp(y_l)| = β⁻/2`: the ratio is exactly 1 for DPO and β⁻/β⁺ = 0.2 for Flex-DPO. The SFT term (the token-mean
# NLL of the chosen replies, weight γ = 0.5) adds γ·B/N_w to the chosen side (B pairs, N_w chosen tokens in the
# batch), so DPO + SFT starts below 1 too.
