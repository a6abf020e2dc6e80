"""3D-properties paper (§3.2): DPO on a toy of 4 prompts × 10 responses with a 3-layer MLP policy.

Responses 0–3: each prompt's optimal (chosen) response; 4–7: rejected responses (one drawn per prompt in every
mini-batch); 8–9: unseen. The SFT policy gives every chosen/rejected-block response 0.12 (on-policy) or 0.02
(off-policy) — the four scenarios — and is the reference. β = 0.1, Adam lr 1e-3, 500 epochs.

    PYTHONPATH=. python examples/toys/dpo_3d_properties.py --out dpo_3d_properties.png

What it shows (paper's Properties 1–3 and §3.3):
  1. drastic drop of the rejected likelihood (tens of nats) while the chosen one gains at most ~1 nat, with
     |∂ℓ/∂π(y_l)| / |∂ℓ/∂π(y_w)| = π(y_w)/π(y_l) exploding (Corollary 1);
  2. the chosen likelihood rising first and falling later, once the chosen gradient has vanished;
  3. probability mass moving to responses outside the prompt's preference pairs;
  and that Flex-DPO (β⁻ < β⁺) and SFT-regularised DPO keep the chosen likelihood up and the mass in place.
"""

import argparse
import math
import time

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trl_refpo.research import toys  # noqa: E402


RUNS = {
    "DPO, scenario 1 (both on-policy)": dict(scenario=1),
    "DPO, scenario 2 (chosen off, rejected on)": dict(scenario=2),
    "DPO, scenario 3 (chosen on, rejected off)": dict(scenario=3),
    "DPO, scenario 4 (both off-policy)": dict(scenario=4),
    "Flex-DPO β⁺=0.1 β⁻=0.02, scenario 1": dict(scenario=1, objective="flex_dpo", beta_rejected=0.02),
    "DPO + 0.1·SFT, scenario 1": dict(scenario=1, objective="sft_dpo", sft_weight=0.1),
}


def summary(name, r):
    peak = r.peak_chosen_epoch()
    nats = lambda p0, p1: math.log(max(p1, 1e-300)) - math.log(p0)  # noqa: E731
    print(f"{name}")
    print(
        f"  chosen π(y_w|x): {r.chosen_mean[0]:.3f} → peak {r.chosen_mean[peak]:.3f} (epoch {peak + 1}) → final "
        f"{r.chosen_mean[-1]:.3f}; min over prompts final {r.chosen_min[-1]:.3f}"
    )
    print(
        f"  rejected π(y_l|x): {r.rejected_mean[0]:.3f} → epoch 10 {r.rejected_mean[9]:.2e} → final "
        f"{r.rejected_mean[-1]:.2e}   (Δlog: rejected {nats(r.rejected_mean[0], r.rejected_mean[-1]):.1f} nats, "
        f"chosen {nats(r.chosen_mean[0], r.chosen_mean[-1]):+.2f} nats)"
    )
    print(
        f"  mass outside the prompt's pairs: {r.out_of_pair_mass[0]:.3f} → {r.out_of_pair_mass[-1]:.3f} "
        f"(unseen block 8–9: {2 * r.unseen_mean[0]:.3f} → {2 * r.unseen_mean[-1]:.3f})"
    )
    print(
        f"  |∂ℓ/∂π(y_l)| / |∂ℓ/∂π(y_w)|: {r.grad_rejected_prob[0] / r.grad_chosen_prob[0]:.2f} → "
        f"{r.grad_rejected_prob[-1] / r.grad_chosen_prob[-1]:.3g};  |∂ℓ/∂lp(y_w)| {r.grad_chosen_logp[0]:.3g} → "
        f"{r.grad_chosen_logp[-1]:.3g}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dpo_3d_properties.png")
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {}
    for name, kwargs in RUNS.items():
        start = time.time()
        results[name] = toys.three_d_properties_toy(epochs=args.epochs, seed=args.seed, **kwargs)
        summary(f"{name}  ({time.time() - start:.1f} s)", results[name])

    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    epochs = range(1, args.epochs + 1)
    dpo = results["DPO, scenario 1 (both on-policy)"]
    curves = [
        ("chosen mean", dpo.chosen_mean, "tab:blue"),
        ("chosen min", dpo.chosen_min, "gold"),
        ("rejected mean", dpo.rejected_mean, "tab:green"),
        ("rejected max", dpo.rejected_max, "tab:red"),
        ("outside the pairs", dpo.out_of_pair_mass, "tab:purple"),
    ]
    for label, values, color in curves:
        axes[0, 0].plot(epochs, values, label=label, color=color)
        axes[0, 2].plot(epochs, [max(v, 1e-300) for v in values], label=label, color=color)
    axes[0, 0].set_title("DPO, scenario 1: likelihoods")
    axes[0, 0].legend()
    axes[0, 2].set_yscale("log")
    axes[0, 2].set_title("the same, log scale")
    axes[0, 1].plot(epochs, dpo.grad_chosen_prob, label="|∂ℓ/∂π(y_w)|")
    axes[0, 1].plot(epochs, dpo.grad_rejected_prob, label="|∂ℓ/∂π(y_l)|")
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_title("DPO, scenario 1: gradient magnitudes")
    axes[0, 1].legend()
    for scenario in range(1, 5):
        name = next(n for n in RUNS if n.startswith(f"DPO, scenario {scenario}"))
        axes[1, 0].plot(epochs, results[name].chosen_mean, label=f"scenario {scenario}")
        axes[1, 1].plot(epochs, results[name].out_of_pair_mass, label=f"scenario {scenario}")
    axes[1, 0].set_title("chosen likelihood, four scenarios")
    axes[1, 0].legend()
    axes[1, 1].set_title("mass outside the prompt's pairs, four scenarios")
    axes[1, 1].legend()
    for name in (
        "DPO, scenario 1 (both on-policy)",
        "Flex-DPO β⁺=0.1 β⁻=0.02, scenario 1",
        "DPO + 0.1·SFT, scenario 1",
    ):
        axes[1, 2].plot(epochs, results[name].chosen_mean, label=name.split(",")[0] + " chosen")
        axes[1, 2].plot(epochs, results[name].out_of_pair_mass, linestyle="--", label=name.split(",")[0] + " outside")
    axes[1, 2].set_title("regularisation (scenario 1)")
    axes[1, 2].legend(fontsize=7)
    for axis in axes.flat:
        axis.set_xlabel("epoch")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
