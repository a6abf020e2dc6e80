"""The papers' toy experiments, built on the package's own loss functions.

* TYPO paper ("New Desiderata for DPO", §5 and App. A.1–A.2): a bandit whose policy is ``softmax(θ)``
  per prompt, trained with Adam on Bradley–Terry-labelled pairs — :func:`train_bandit`,
  :func:`interpolation_test`, :func:`lambda_sweep`, :func:`preservation_test`.
* 3D-properties paper (§3.2): 4 prompts × 10 responses, a 3-layer MLP policy, the four on/off-policy
  initialisations — :func:`three_d_properties_toy`.

Everything runs on a CPU in seconds and is deterministic for a given seed. The examples in
``examples/toys/`` print and plot these results; ``tests/test_toys.py`` asserts the papers' claims.

How λ enters each method (TYPO paper §2, Eq. 7 and 10, as in its Fig. 5–6): DPO is
``−log σ(λ·Δ)`` (λ is DPO's β), IPO is ``(Δ − 1/(2λ))²`` (λ is IPO's τ; TRL's ``ipo`` with β = λ, one
token per response) and TYPO is ``softplus(lp(y_l) − lp(y_w)) − λ·lp(y_ref)`` with ``y_ref ~ π_ref``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..objectives import losses
from ..objectives.trl_losses import ipo as trl_ipo_loss


BANDIT_METHODS = ("dpo", "ipo", "typo")
PAIR_TYPES = torch.tensor([[0, 1], [1, 2], [0, 2]])  # {a,b}, {b,c}, {a,c}

# TYPO paper, App. A.1.
INTERPOLATION_PI_STAR = (0.6, 0.3, 0.1)
INTERPOLATION_PI_REF = (0.4, 0.4, 0.2)
PRESERVATION_PI_STAR = ((0.6, 0.3, 0.1), (0.4, 0.2, 0.4))  # (good prompt x_g, bad prompt x_b)
PRESERVATION_PI_REF = ((0.6, 0.3, 0.1), (0.6, 0.2, 0.2))
PAPER_LEARNING_RATES = {"dpo": 1e-3, "ipo": 1e-3, "typo": 5e-4}
MAX_GRAD_NORM = 10.0


def single_threaded(function):
    """Run on one intra-op thread: these tensors are tiny, and on a busy machine every OpenMP region of
    a 2-thread pool waits for a core (measured: 8–16 ms per ``logsigmoid`` of 20 numbers vs 2 µs)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper


def bradley_terry_preference(pi_star: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``p(y_1 ≻ y_2) = π*(y_1) / (π*(y_1) + π*(y_2))`` (TYPO paper Eq. 55: BT with ``r* = log π*``)."""
    return pi_star.gather(-1, first) / (pi_star.gather(-1, first) + pi_star.gather(-1, second))


def bandit_pair_losses(
    method: str,
    lam: Tensor,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    ref_sample_logps: Tensor,
) -> Tensor:
    """Per-pair losses of one bandit method; ``lam`` broadcasts against the ``(runs, batch)`` log-probs."""
    if method == "dpo":
        return losses.sigmoid_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, lam)
    if method == "ipo":
        ones = torch.ones_like(chosen_logps)
        return trl_ipo_loss(
            chosen_logps - ref_chosen_logps,
            rejected_logps - ref_rejected_logps,
            lam,
            chosen_lengths=ones,
            rejected_lengths=ones,
        )
    if method == "typo":
        return losses.typo_loss(chosen_logps, rejected_logps, ref_sample_logps, lam)
    raise ValueError(f"Unknown bandit method {method!r}; choose from {BANDIT_METHODS}.")


@dataclass
class BanditResult:
    """Runs of :func:`train_bandit`: one per (method, λ)."""

    methods: list[str]
    lambdas: list[float]
    final: Tensor  # (runs, prompts, responses): π_θ averaged over the last ``average_last`` steps
    trajectory: Tensor  # (records, runs, prompts, responses)
    recorded_steps: list[int]
    pi_star: Tensor
    pi_ref: Tensor

    def index(self, method: str, lam: float) -> int:
        for run, (m, value) in enumerate(zip(self.methods, self.lambdas, strict=True)):
            if m == method and value == lam:
                return run
        raise KeyError((method, lam))

    def policy(self, method: str, lam: float) -> Tensor:
        """Final distribution ``(prompts, responses)`` of one run."""
        return self.final[self.index(method, lam)]


@single_threaded
def train_bandit(
    methods: list[str],
    lambdas: list[float],
    pi_star=INTERPOLATION_PI_STAR,
    pi_ref=INTERPOLATION_PI_REF,
    steps: int = 6000,
    batch_size: int = 20,
    learning_rates: dict[str, float] | None = None,
    init: str | list[str] = "reference",
    seed: int = 0,
    record_every: int = 50,
    average_last: int = 500,
) -> BanditResult:
    """Train one softmax bandit policy per ``(methods[i], lambdas[i])`` on BT-labelled pairs.

    ``pi_star`` / ``pi_ref`` are ``(responses,)`` or ``(prompts, responses)``; prompts are drawn
    uniformly, the pair type uniformly from ``{ab, bc, ac}``, the winner by Bradley–Terry from ``π*``,
    and TYPO's unsupervised sample from ``π_ref`` of the same prompt (one per pair). Every run has its
    own θ, Adam state and gradient clipping (max norm 10, paper App. A.1); the runs are batched into
    one computation, which is exact because Adam is element-wise. ``init`` is ``"reference"``
    (θ = log π_ref) or ``"uniform"`` (θ = 0). Returns the final distributions averaged over the last
    ``average_last`` steps (Adam with a constant step size never settles exactly) and a trajectory.
    """
    if len(methods) != len(lambdas):
        raise ValueError("methods and lambdas must have the same length (one run each).")
    learning_rates = {**PAPER_LEARNING_RATES, **(learning_rates or {})}
    generator = torch.Generator().manual_seed(seed)
    pi_star = _as_prompt_table(pi_star)
    pi_ref = _as_prompt_table(pi_ref)
    num_prompts, num_responses = pi_star.shape
    log_ref = pi_ref.log()

    inits = [init] * len(methods) if isinstance(init, str) else list(init)
    bad = sorted(set(inits) - {"reference", "uniform"})
    if bad or len(inits) != len(methods):
        raise ValueError(f"init must be 'reference' or 'uniform' (or one of those per run), got {init!r}.")
    groups = {}  # method -> (run indices, θ, λ column)
    for method in dict.fromkeys(methods):
        runs = [run for run, m in enumerate(methods) if m == method]
        theta = torch.stack([log_ref if inits[run] == "reference" else torch.zeros_like(log_ref) for run in runs])
        theta.requires_grad_(True)
        lam = torch.tensor([lambdas[run] for run in runs], dtype=torch.float64).unsqueeze(1)
        groups[method] = (runs, theta, lam)
    optimizer = torch.optim.Adam(
        [{"params": [theta], "lr": learning_rates[method]} for method, (_, theta, _) in groups.items()]
    )

    num_runs = len(methods)
    trajectory, recorded_steps = [], []
    running_sum = torch.zeros(num_runs, num_prompts, num_responses, dtype=torch.float64)
    for chunk_start in range(0, steps, SAMPLING_CHUNK):
        chunk = _sample_bandit_batches(
            min(SAMPLING_CHUNK, steps - chunk_start), num_runs, batch_size, pi_star, pi_ref, generator
        )
        for offset in range(chunk["chosen"].size(0)):
            step = chunk_start + offset
            optimizer.zero_grad()
            total = 0.0
            for method, (runs, theta, lam) in groups.items():
                flat_logps = theta.log_softmax(-1).flatten(1)  # (runs_m, prompts·responses)
                pick = lambda name: flat_logps.gather(1, chunk[name][offset, runs])  # noqa: B023, E731
                per_pair = bandit_pair_losses(
                    method,
                    lam,
                    pick("chosen"),
                    pick("rejected"),
                    chunk["ref_chosen_logps"][offset, runs],
                    chunk["ref_rejected_logps"][offset, runs],
                    pick("ref_sample"),
                )
                total = total + per_pair.mean(dim=1).sum()
            total.backward()
            with torch.no_grad():
                for _, theta, _ in groups.values():
                    norms = theta.grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                    theta.grad.mul_((MAX_GRAD_NORM / norms).clamp(max=1.0).view(-1, 1, 1))
            optimizer.step()

            if step >= steps - average_last or step % record_every == 0 or step == steps - 1:
                probs = _current_probs(groups, num_runs, num_prompts, num_responses)
                if step >= steps - average_last:
                    running_sum += probs
                if step % record_every == 0 or step == steps - 1:
                    trajectory.append(probs)
                    recorded_steps.append(step + 1)
    final = running_sum / min(average_last, steps)
    return BanditResult(
        list(methods), [float(v) for v in lambdas], final, torch.stack(trajectory), recorded_steps, pi_star, pi_ref
    )


SAMPLING_CHUNK = 500


def _sample_bandit_batches(num_steps, num_runs, batch_size, pi_star, pi_ref, generator) -> dict[str, Tensor]:
    """Pairs, BT labels and reference samples for ``num_steps`` steps, as flat ``prompt·R + response`` indices."""
    shape = (num_steps, num_runs, batch_size)
    num_prompts, num_responses = pi_star.shape
    prompts = torch.randint(num_prompts, shape, generator=generator)
    pair = PAIR_TYPES[torch.randint(3, shape, generator=generator)]
    first, second = pair[..., 0], pair[..., 1]
    star = pi_star[prompts]
    p_first = bradley_terry_preference(star, first.unsqueeze(-1), second.unsqueeze(-1)).squeeze(-1)
    first_wins = torch.rand(shape, generator=generator, dtype=torch.float64) < p_first
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    ref_sample = torch.multinomial(pi_ref[prompts].reshape(-1, num_responses), 1, generator=generator).view(shape)
    log_ref = pi_ref.log()
    base = prompts * num_responses
    return {
        "chosen": base + chosen,
        "rejected": base + rejected,
        "ref_sample": base + ref_sample,
        "ref_chosen_logps": log_ref[prompts, chosen],
        "ref_rejected_logps": log_ref[prompts, rejected],
    }


def _as_prompt_table(values) -> Tensor:
    table = torch.as_tensor(values, dtype=torch.float64)
    return table.unsqueeze(0) if table.dim() == 1 else table


def _current_probs(groups, num_runs, num_prompts, num_responses) -> Tensor:
    probs = torch.empty(num_runs, num_prompts, num_responses, dtype=torch.float64)
    with torch.no_grad():
        for runs, theta, _ in groups.values():
            probs[runs] = theta.softmax(-1)
    return probs


def dpo_population_optimum(pi_star, pi_ref, lam: float) -> Tensor:
    """DPO's minimiser with BT labels on every pair: ``π ∝ π_ref·exp(r*/λ) = π_ref·π*^{1/λ}`` (TYPO paper Eq. 5)."""
    pi_star, pi_ref = _as_prompt_table(pi_star), _as_prompt_table(pi_ref)
    return (pi_ref.log() + pi_star.log() / lam).softmax(-1)


def typo_population_optimum(pi_star, pi_ref, lam: float) -> Tensor:
    """The minimiser of TYPO's expected loss on the bandit (pairs uniform over {ab, bc, ac}, BT labels, y_ref ~ π_ref).

    ``π*`` for λ → 0, ``π_ref`` for λ → ∞, in between otherwise (paper Prop. 4.2). Solved with L-BFGS.
    """
    pi_star, pi_ref = _as_prompt_table(pi_star), _as_prompt_table(pi_ref)
    theta = pi_ref.log().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15)
    first, second = PAIR_TYPES[:, 0], PAIR_TYPES[:, 1]
    p_first = pi_star[:, first] / (pi_star[:, first] + pi_star[:, second])

    def closure():
        optimizer.zero_grad()
        logps = theta.log_softmax(-1)
        supervised = p_first * F.softplus(logps[:, second] - logps[:, first]) + (1 - p_first) * F.softplus(
            logps[:, first] - logps[:, second]
        )
        loss = supervised.mean(-1).sum() - lam * (pi_ref * logps).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return theta.detach().softmax(-1)


def interpolation_test(lam: float = 1e-5, seed: int = 0, steps: int = 6000, **kwargs) -> BanditResult:
    """TYPO paper §5 / Fig. 2: λ small → TYPO converges to π*, DPO and IPO to the mode of π*."""
    return train_bandit(list(BANDIT_METHODS), [lam] * 3, seed=seed, steps=steps, **kwargs)


SWEEP_LAMBDAS = (1e-5, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


def lambda_sweep(
    lambdas=SWEEP_LAMBDAS, seed: int = 0, steps: int = 6000, init: str = "uniform", **kwargs
) -> BanditResult:
    """TYPO paper App. A.2 / Fig. 5–6: every method for every λ; large λ → π_ref for all methods.

    Starts from the uniform policy (not π_ref) so that ending at π_ref is something the loss does,
    not where the run began.
    """
    methods = [method for method in BANDIT_METHODS for _ in lambdas]
    values = [lam for _ in BANDIT_METHODS for lam in lambdas]
    return train_bandit(methods, values, seed=seed, steps=steps, init=init, **kwargs)


PRESERVATION_LAMBDAS = (1e-5, 1e-3, 1e-2, 0.1, 1.0, 10.0)


def preservation_test(lambdas=PRESERVATION_LAMBDAS, seed: int = 0, steps: int = 6000, **kwargs) -> BanditResult:
    """TYPO paper §5 / Fig. 3: a good prompt (π_ref = π*) and a bad one (π_ref ≠ π*), θ ∈ R^{2×3}.

    Prompts are drawn with equal probability, training starts at π_ref, batch 20 (the paper uses batch 1
    here; the optima are the same, the noise smaller). The λ range stops at 10: beyond it every method stays
    at π_ref (see :func:`lambda_sweep`), so no method can improve the bad prompt measurably.
    """
    methods = [method for method in BANDIT_METHODS for _ in lambdas]
    values = [lam for _ in BANDIT_METHODS for lam in lambdas]
    return train_bandit(
        methods, values, pi_star=PRESERVATION_PI_STAR, pi_ref=PRESERVATION_PI_REF, seed=seed, steps=steps, **kwargs
    )


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """``½·Σ|p − q|`` over the last dimension."""
    return 0.5 * (p - q).abs().sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# 3D-properties toy (Yan et al., "3D-Properties: Identifying Challenges in DPO", §3.2)

NUM_PROMPTS = 4
NUM_RESPONSES = 10
CHOSEN = tuple(range(4))  # response i is the optimal (chosen) response of prompt i
REJECTED = tuple(range(4, 8))
UNSEEN = (8, 9)
ON_POLICY, OFF_POLICY = 0.12, 0.02
# Responses that never appear in a preference pair of the prompt: the other prompts' optimal responses and the
# unseen block.
OUT_OF_PAIR_MASK = torch.ones(NUM_PROMPTS, NUM_RESPONSES, dtype=torch.bool)
OUT_OF_PAIR_MASK[:, list(REJECTED)] = False
OUT_OF_PAIR_MASK[torch.arange(NUM_PROMPTS), torch.tensor(CHOSEN)] = False
SCENARIOS = {  # scenario -> (initial likelihood of each chosen-block response, of each rejected-block response)
    1: (ON_POLICY, ON_POLICY),  # both on-policy
    2: (OFF_POLICY, ON_POLICY),  # chosen off-policy, rejected on-policy
    3: (ON_POLICY, OFF_POLICY),  # chosen on-policy, rejected off-policy
    4: (OFF_POLICY, OFF_POLICY),  # both off-policy
}


def scenario_distribution(scenario: int) -> Tensor:
    """The SFT policy of a scenario, the same for every prompt: each of the 4 chosen-block and 4 rejected-block
    responses gets 0.12 (on-policy) or 0.02 (off-policy); the 2 unseen responses share the rest."""
    chosen, rejected = SCENARIOS[scenario]
    row = torch.empty(NUM_RESPONSES, dtype=torch.float64)
    row[list(CHOSEN)] = chosen
    row[list(REJECTED)] = rejected
    row[list(UNSEEN)] = (1.0 - 4 * chosen - 4 * rejected) / len(UNSEEN)
    return row.expand(NUM_PROMPTS, NUM_RESPONSES).clone()


class MLPPolicy(torch.nn.Module):
    """Three linear layers: one-hot prompt → categorical distribution over the 10 responses."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(NUM_PROMPTS, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, NUM_RESPONSES),
        )

    def forward(self, prompts: Tensor) -> Tensor:
        return self.net(F.one_hot(prompts, NUM_PROMPTS).to(self.net[0].weight.dtype)).log_softmax(-1)


def sft_initialise(policy: MLPPolicy, target: Tensor, steps: int = 1500, lr: float = 1e-2) -> float:
    """ "Pretraining and SFT": fit the policy to the target distribution (cross-entropy to soft labels).

    Returns the largest absolute probability error afterwards.
    """
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    prompts = torch.arange(NUM_PROMPTS)
    target = target.to(policy.net[0].weight.dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        (-(target * policy(prompts)).sum(-1).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        return float((policy(prompts).exp() - target).abs().max())


@dataclass
class ThreeDResult:
    """Per-epoch curves of one 3D-properties run (all averaged over the 4 prompts)."""

    scenario: int
    objective: str
    chosen_mean: list[float] = field(default_factory=list)  # π(y_w|x) of each prompt's optimal response
    chosen_min: list[float] = field(default_factory=list)
    rejected_mean: list[float] = field(default_factory=list)  # mean π over the rejected block
    rejected_max: list[float] = field(default_factory=list)
    unseen_mean: list[float] = field(default_factory=list)  # mean π over the 2 unseen responses
    out_of_pair_mass: list[float] = field(default_factory=list)  # Σ π over responses never paired with the prompt
    grad_chosen_prob: list[float] = field(default_factory=list)  # |∂ℓ/∂π(y_w)| (the paper's Fig. 2, middle)
    grad_rejected_prob: list[float] = field(default_factory=list)  # |∂ℓ/∂π(y_l)|
    grad_chosen_logp: list[float] = field(default_factory=list)  # |∂ℓ/∂log π(y_w)| (what the trainer logs)
    grad_rejected_logp: list[float] = field(default_factory=list)
    initial: Tensor | None = None  # (prompts, responses)
    final: Tensor | None = None

    def peak_chosen_epoch(self) -> int:
        return max(range(len(self.chosen_mean)), key=self.chosen_mean.__getitem__)


@single_threaded
def three_d_properties_toy(
    scenario: int = 1,
    objective: str = "dpo",
    beta: float = 0.1,
    beta_rejected: float | None = None,
    sft_weight: float = 0.0,
    epochs: int = 500,
    steps_per_epoch: int = 4,
    lr: float = 1e-3,
    hidden: int = 64,
    seed: int = 0,
) -> ThreeDResult:
    """DPO (or Flex-DPO / SFT-regularised DPO) on the 3D-properties toy of one scenario.

    Preference data (our reading of §3.2, which does not spell it out): prompt i is paired with its optimal
    response i (chosen) and, in every mini-batch, with a rejected response drawn uniformly from the
    rejected block (responses 4–7). A mini-batch holds the 4 prompts. The reference is the SFT-initialised
    policy. Adam and β = 0.1 (the paper's real-LLM settings; the toy's optimiser is not given).

    What the curves show with these settings: the rejected likelihood collapses by tens of nats while the
    chosen one gains under a nat; ``|∂ℓ/∂π(y_l)| / |∂ℓ/∂π(y_w)| = π(y_w)/π(y_l)`` explodes and
    ``|∂ℓ/∂lp(y_w)|`` vanishes; the chosen likelihood peaks early and then falls; the freed mass goes to
    responses outside the prompt's preference pairs (``out_of_pair_mass``). That mass lands on the other
    prompts' optimal responses (pushed up through the shared layers), not on the unseen block 8–9, whose
    likelihood falls too (softmax "squeezing" towards the likeliest responses) — the paper's Fig. 2 shows it
    rising; its toy code is not public.

    ``objective``:
    ``"dpo"`` (:func:`~trl_refpo.objectives.losses.sigmoid_dpo_loss`), ``"flex_dpo"`` (β⁺ = ``beta``, β⁻ =
    ``beta_rejected``; :func:`~trl_refpo.objectives.losses.flex_dpo_loss`), ``"sft_dpo"`` (DPO + ``sft_weight`` ×
    the chosen NLL, Eq. 6, :func:`~trl_refpo.objectives.losses.sft_loss` on one-token responses).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = MLPPolicy(hidden).double()
    target = scenario_distribution(scenario)
    sft_initialise(policy, target)
    prompts = torch.arange(NUM_PROMPTS)
    with torch.no_grad():
        ref_logps = policy(prompts)
    result = ThreeDResult(scenario, objective, initial=ref_logps.exp())
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    chosen = torch.tensor(CHOSEN)
    for _ in range(epochs):
        sums = torch.zeros(4, dtype=torch.float64)
        for _ in range(steps_per_epoch):
            rejected = torch.tensor(REJECTED)[torch.randint(len(REJECTED), (NUM_PROMPTS,), generator=generator)]
            logps = policy(prompts)
            chosen_logps = logps.gather(1, chosen.unsqueeze(1)).squeeze(1)
            rejected_logps = logps.gather(1, rejected.unsqueeze(1)).squeeze(1)
            ref_chosen = ref_logps.gather(1, chosen.unsqueeze(1)).squeeze(1)
            ref_rejected = ref_logps.gather(1, rejected.unsqueeze(1)).squeeze(1)
            loss = _three_d_loss(
                objective, chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta, beta_rejected, sft_weight
            )
            grad_chosen, grad_rejected = torch.autograd.grad(loss, (chosen_logps, rejected_logps), retain_graph=True)
            # Per-pair gradients of the pair's own loss (the mean over the batch divides by B).
            grad_chosen, grad_rejected = grad_chosen * NUM_PROMPTS, grad_rejected * NUM_PROMPTS
            sums += torch.stack(
                [
                    grad_chosen.abs().mean(),
                    grad_rejected.abs().mean(),
                    (grad_chosen / chosen_logps.exp()).abs().mean(),
                    (grad_rejected / rejected_logps.exp()).abs().mean(),
                ]
            ).detach()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            probs = policy(prompts).exp()
        chosen_probs = probs[prompts, chosen]
        rejected_probs = probs[:, list(REJECTED)]
        result.chosen_mean.append(float(chosen_probs.mean()))
        result.chosen_min.append(float(chosen_probs.min()))
        result.rejected_mean.append(float(rejected_probs.mean()))
        result.rejected_max.append(float(rejected_probs.max()))
        result.unseen_mean.append(float(probs[:, list(UNSEEN)].mean()))
        result.out_of_pair_mass.append(float((probs * OUT_OF_PAIR_MASK).sum(-1).mean()))
        grads = (sums / steps_per_epoch).tolist()
        result.grad_chosen_logp.append(grads[0])
        result.grad_rejected_logp.append(grads[1])
        result.grad_chosen_prob.append(grads[2])
        result.grad_rejected_prob.append(grads[3])
    result.final = probs
    return result


def _three_d_loss(objective, chosen, rejected, ref_chosen, ref_rejected, beta, beta_rejected, sft_weight):
    if objective == "dpo":
        per_pair = losses.sigmoid_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    elif objective == "flex_dpo":
        per_pair = losses.flex_dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta, beta if beta_rejected is None else beta_rejected
        )
    elif objective == "sft_dpo":
        per_pair = losses.sigmoid_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    else:
        raise ValueError(f"Unknown objective {objective!r}: use 'dpo', 'flex_dpo' or 'sft_dpo'.")
    loss = per_pair.mean()
    if objective == "sft_dpo":
        # One-token responses: the chosen NLL is TRL's `sft` term (3D-properties Eq. 6).
        loss = loss + sft_weight * losses.sft_loss(chosen.unsqueeze(1), torch.ones_like(chosen).unsqueeze(1))
    return loss
