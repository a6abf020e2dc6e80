"""The forward heads shared by the policy and the reference: completion-token log-probs (:mod:`.completion`) and
ε-DPO's perturbed-head scorer (:mod:`.perturbation`). Nothing here imports the reference sources, the trainer or the
config."""
