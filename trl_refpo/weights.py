"""A model's weights read the same under every engine: their hash (TRL's ``hash_module`` bytes) and a block in which
every weight is present on this process.

Under ZeRO-3 with ``zero.Init`` the parameters are partitioned placeholders, and ``hash_module`` (what TRL keys its
precompute cache on) hashes those: every model of one architecture hashes alike. :func:`full_weights_hash` gathers
each partitioned parameter, one at a time, and hashes exactly what ``hash_module`` hashes on the full model.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned ``module``'s parameters (``zero.Init`` or an engine)."""
    return any(hasattr(parameter, "ds_id") for parameter in module.parameters())


@contextlib.contextmanager
def full_weights_present(module: torch.nn.Module):
    """Every parameter of ``module`` whole on this process inside the block, read-only (ZeRO-3: gathered, then
    partitioned again on exit; otherwise nothing to do), so each process can run forwards of its own, e.g.
    ``generate`` on its share of the prompts. Entering and leaving are collective under ZeRO-3: every process
    enters, at the same point. It costs one full copy of the weights per process for the block's duration."""
    module = getattr(module, "module", module)
    if not is_partitioned(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def full_weights_hash(module: torch.nn.Module) -> str:
    """TRL's ``hash_module`` of ``module``'s full weights, with ZeRO-3 partitioned parameters gathered one by one.

    Same bytes as ``hash_module`` on the unpartitioned model, so one process and ZeRO-3 share a cache key. With
    partitioned parameters it is collective: every process calls it, in the same order.
    """
    module = getattr(module, "module", module)  # a DeepSpeed engine wraps the model
    if not is_partitioned(module):
        from trl.trainer.utils import hash_module

        return hash_module(module)
    import deepspeed

    parameters = dict(module.named_parameters(remove_duplicate=False))
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        parameter = parameters.get(name)
        if parameter is not None and hasattr(parameter, "ds_id"):
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                _hash_tensor(digest, parameter.data)
        else:
            _hash_tensor(digest, tensor)
    return digest.hexdigest()


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu()
    digest.update(str(tensor.dtype).encode())
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.to(torch.float32)
    digest.update(tensor.numpy().tobytes())
