"""Tiny models of the families whose LM heads differ (softcap, logit scale), and drifted copies, shared by tests."""

import copy

import torch
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM


def moved(model, seed, scale=0.05):
    """A copy of ``model`` with perturbed weights: a policy that has drifted from its reference."""
    generator = torch.Generator().manual_seed(seed)
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return policy


def gemma2_with_softcap(tokenizer):
    return Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=2.0,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=256,
        )
    )


def cohere_with_logit_scale(tokenizer):
    return CohereForCausalLM(
        CohereConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            logit_scale=0.5,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=256,
        )
    )
