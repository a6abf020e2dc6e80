"""TYPO paper, preservation test (§5, Fig. 3 left and middle; App. A.1 values), on the package's own losses.

Two prompts drawn with equal probability: on the good prompt π_ref = π* = (0.6, 0.3, 0.1); on the bad one
π* = (0.4, 0.2, 0.4) and π_ref = (0.6, 0.2, 0.2). θ ∈ R^{2×3}, Adam, batch 20 (the paper uses batch 1 here;
20 gives the same optima with less noise), training starts at π_ref.

    PYTHONPATH=. python examples/toys/typo_preservation.py --out typo_preservation.png

Expected: only TYPO keeps the good prompt at π* while improving the bad one (closer to π* than π_ref is),
for every λ (up to 10; beyond, every method simply stays at π_ref). Error = total variation distance to π*;
"preserves" = good error ≤ 0.03, "improves" = bad error at least 0.01 below π_ref's.
"""

import argparse
import time

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trl_refpo.research import toys  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="typo_preservation.png")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.time()
    result = toys.preservation_test(steps=args.steps, seed=args.seed)
    reference_error = toys.total_variation(result.pi_ref, result.pi_star)
    print(
        f"π_ref's error (TV to π*): good {reference_error[0]:.3f}, bad {reference_error[1]:.3f}  ({time.time() - start:.1f} s)\n"
    )
    print(f"{'method':6s} {'λ':>8s}  {'good err':>8s}  {'bad err':>8s}  preserves good & improves bad")
    errors = {}
    for method in toys.BANDIT_METHODS:
        for lam in toys.PRESERVATION_LAMBDAS:
            error = toys.total_variation(result.policy(method, lam), result.pi_star)
            errors[method, lam] = error
            both = error[0] <= 0.03 and error[1] < reference_error[1] - 0.01
            print(f"{method:6s} {lam:8g}  {error[0]:8.3f}  {error[1]:8.3f}  {'yes' if both else 'no'}")

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for side, title in enumerate(["good prompt (π_ref = π*)", "bad prompt (π_ref ≠ π*)"]):
        axis = axes[side]
        for method in toys.BANDIT_METHODS:
            axis.plot(
                toys.PRESERVATION_LAMBDAS,
                [errors[method, lam][side].item() for lam in toys.PRESERVATION_LAMBDAS],
                marker="o",
                label=method.upper(),
            )
        axis.axhline(reference_error[side].item(), color="gray", linestyle="--", label="π_ref")
        axis.set_xscale("log")
        axis.set_xlabel("λ")
        axis.set_ylabel("TV(π_θ, π*)")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
