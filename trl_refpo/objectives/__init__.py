"""The loss types: pure losses (:mod:`.losses`, :mod:`.trl_losses`), their training-time state (:mod:`.controllers`),
one :class:`~.base.Objective` per ``loss_type`` (:mod:`.loss_types`) and the registry that maps names to them
(:mod:`.registry`). Nothing here imports the trainer, the config or the reference sources."""
