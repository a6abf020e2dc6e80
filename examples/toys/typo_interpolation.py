"""TYPO paper, interpolation test (§5, Fig. 2) and λ sweep (App. A.2, Fig. 5–6), on the package's own losses.

A 3-response bandit: π* = (0.6, 0.3, 0.1), π_ref = (0.4, 0.4, 0.2), pairs {ab, bc, ac} labelled by
Bradley–Terry from π*, policy softmax(θ), Adam (lr 1e-3 for DPO/IPO, 5e-4 for TYPO), batch 20, gradient
clipping at norm 10. λ is DPO's β, IPO's τ and TYPO's weight of the reference-sample NLL.

    PYTHONPATH=. python examples/toys/typo_interpolation.py --out typo_interpolation.png

Expected: with λ = 1e-5 TYPO ends at π* while DPO and IPO end near the mode (1, 0, 0); as λ grows every
method ends at π_ref (the sweep starts from the uniform policy, so this is the loss's doing).
"""

import argparse
import time

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trl_refpo.research import toys  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="typo_interpolation.png")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.time()
    curves = toys.interpolation_test(lam=1e-5, steps=args.steps, seed=args.seed)
    sweep = toys.lambda_sweep(steps=args.steps, seed=args.seed)
    print(f"π* = {toys.INTERPOLATION_PI_STAR}, π_ref = {toys.INTERPOLATION_PI_REF}  ({time.time() - start:.1f} s)\n")
    print("Interpolation test, λ = 1e-5, start at π_ref (final π_θ, mean of the last 500 steps):")
    for method in toys.BANDIT_METHODS:
        policy = curves.policy(method, 1e-5)[0]
        gap = (policy - curves.pi_star[0]).abs().max().item()
        print(f"  {method:5s} π_θ = ({', '.join(f'{p:.3f}' for p in policy.tolist())})   L∞ to π* = {gap:.3f}")
    print("\nλ sweep, start at the uniform policy (final π_θ; L∞ distance to π_ref):")
    for method in toys.BANDIT_METHODS:
        for lam in toys.SWEEP_LAMBDAS:
            policy = sweep.policy(method, lam)[0]
            to_ref = (policy - sweep.pi_ref[0]).abs().max().item()
            theory = {"typo": toys.typo_population_optimum, "dpo": toys.dpo_population_optimum}.get(method)
            optimum = (
                ""
                if theory is None
                else "  optimum ("
                + ", ".join(
                    f"{p:.3f}" for p in theory(toys.INTERPOLATION_PI_STAR, toys.INTERPOLATION_PI_REF, lam)[0].tolist()
                )
                + ")"
            )
            print(
                f"  {method:5s} λ = {lam:<7g} π_θ = ({', '.join(f'{p:.3f}' for p in policy.tolist())})  "
                f"to π_ref {to_ref:.3f}{optimum}"
            )

    figure, axes = plt.subplots(2, 3, figsize=(14, 8))
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for column, method in enumerate(toys.BANDIT_METHODS):
        run = curves.index(method, 1e-5)
        axis = axes[0, column]
        for response, color in enumerate(colors):
            axis.plot(
                curves.recorded_steps,
                curves.trajectory[:, run, 0, response],
                color=color,
                label=f"π(y_{'abc'[response]})",
            )
            axis.axhline(toys.INTERPOLATION_PI_STAR[response], color=color, linestyle="--", linewidth=0.8)
        axis.set_title(f"{method.upper()}, λ = 1e-5 (dashed: π*)")
        axis.set_xlabel("step")
        axis.set_ylim(0, 1)
        axis.legend()
        axis = axes[1, column]
        for response, color in enumerate(colors):
            values = [sweep.policy(method, lam)[0, response].item() for lam in toys.SWEEP_LAMBDAS]
            axis.plot(toys.SWEEP_LAMBDAS, values, marker="o", color=color, label=f"π(y_{'abc'[response]})")
            axis.axhline(toys.INTERPOLATION_PI_REF[response], color=color, linestyle=":", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_ylim(0, 1)
        axis.set_xlabel("λ")
        axis.set_title(f"{method.upper()}: converged π_θ vs λ (dotted: π_ref)")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
