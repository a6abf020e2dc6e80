"""Where the reference log-probs come from: the sources (:mod:`.sources`), the cross-tokenizer and prior text
reference (:mod:`.text`), their setup at construction (:mod:`.setup`), precompute and the on-disk cache
(:mod:`.precompute`, :mod:`.fingerprints`), the rules that refuse a bad combination (:mod:`.rules`) and the one view of
the trainer they read (:mod:`.handle`). Nothing here imports :mod:`trl_refpo.objectives` or the trainer."""
