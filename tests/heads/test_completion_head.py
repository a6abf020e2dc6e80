"""The completion head (trl_refpo.heads.completion): the model's own log-softmax on completion positions, nothing else."""

import copy

import pytest
import torch
from model_families import cohere_with_logit_scale, gemma2_with_softcap
from trl.trainer.utils import add_fused_lm_head

from trl_refpo.heads import completion as lm_head
from trl_refpo.heads.completion import add_completion_head, completion_head_outputs
from trl_refpo.research.token_analysis import frozen_copy
from trl_refpo.testing import tiny_llama


def padded_batch(tokenizer, seed=0):
    """Three rows of different lengths, right-padded; the completion is each row's second part."""
    generator = torch.Generator().manual_seed(seed)
    lengths, prompt_lengths = [12, 9, 5], [4, 6, 2]
    input_ids = torch.full((3, 12), tokenizer.pad_token_id)
    attention_mask = torch.zeros(3, 12, dtype=torch.long)
    completion_mask = torch.zeros(3, 12, dtype=torch.long)
    for row, (length, prompt) in enumerate(zip(lengths, prompt_lengths)):
        input_ids[row, :length] = torch.randint(5, len(tokenizer), (length,), generator=generator)
        attention_mask[row, :length] = 1
        completion_mask[row, prompt:length] = 1
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return input_ids, attention_mask, completion_mask, labels


def plain_log_softmax(model, input_ids, attention_mask, completion_mask):
    """Per-token log-probs and entropies from the model's own full logits (softcap / logit scale included)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    log_probs = logits.log_softmax(-1)
    mask = completion_mask[:, 1:].bool()
    target = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return target * mask, entropy * mask


def llama(tokenizer):
    return tiny_llama(tokenizer, seed=0)


@pytest.mark.parametrize("build", [llama, gemma2_with_softcap, cohere_with_logit_scale])
@pytest.mark.parametrize("tile_elements", [7, lm_head.TILE_ELEMENTS])
def test_equals_the_models_own_log_softmax_with_gradients(build, tile_elements, tokenizer):
    """Values and parameter gradients equal the full-logits computation, for tiles one vocabulary entry wide
    (tile_elements=7 < tokens) and for a tile holding the whole vocabulary."""
    torch.manual_seed(0)
    model = build(tokenizer)
    expected_model = copy.deepcopy(model)
    input_ids, attention_mask, completion_mask, labels = padded_batch(tokenizer)
    weights = torch.randn(3, 11)

    add_completion_head(model, tile_elements=tile_elements)
    outputs = completion_head_outputs(model, input_ids, attention_mask, labels, entropy=True)
    expected_logps, expected_entropy = plain_log_softmax(expected_model, input_ids, attention_mask, completion_mask)

    torch.testing.assert_close(outputs.log_probs, expected_logps, rtol=0, atol=2e-6)
    torch.testing.assert_close(outputs.entropy, expected_entropy, rtol=0, atol=2e-6)
    assert (outputs.log_probs[~completion_mask[:, 1:].bool()] == 0).all()
    (outputs.log_probs * weights).sum().backward()
    (expected_logps * weights).sum().backward()
    expected_grads = dict(expected_model.named_parameters())
    for name, parameter in model.named_parameters():
        expected = expected_grads[name].grad
        # fp32 rounding of two summation orders grows with the gradients' scale (transformers 4.x initialises
        # Gemma-2 with ~3x larger gradients here than 5.x): 1e-6 of the largest entry, at least 1e-6.
        atol = 1e-6 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=atol, msg=name)


def test_only_completion_positions_are_projected_in_bounded_tiles(tokenizer, monkeypatch):
    calls = []
    kernel = lm_head.ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, vocab_tile, *rest):
            calls.append((hidden.shape[0], vocab_tile))
            return kernel.apply(hidden, weight, bias, targets, temperature, vocab_tile, *rest)

    monkeypatch.setattr(lm_head, "ChunkedLogProbFunction", Recording)
    model = tiny_llama(tokenizer)
    input_ids, attention_mask, completion_mask, labels = padded_batch(tokenizer)
    add_completion_head(model, tile_elements=40)
    completion_head_outputs(model, input_ids, attention_mask, labels, entropy=False)
    tokens = int(completion_mask[:, 1:].sum())
    assert tokens == 14  # of 33 shifted positions, all of which TRL's head projects on CPU
    assert calls == [(tokens, 40 // tokens)]


def test_other_forwards_are_unchanged(tokenizer):
    """Plain forwards (logits) and TRL's fused head give what they gave before the completion head was added."""
    model = tiny_llama(tokenizer)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    input_ids, attention_mask, _, labels = padded_batch(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        add_completion_head(model)
        add_completion_head(model)  # idempotent
        assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, logits)
        fused_after = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert torch.equal(fused_after.log_probs, fused.log_probs)
    assert torch.equal(fused_after.entropy, fused.entropy)


def test_a_copied_model_scores_with_its_own_weights(tokenizer):
    model = tiny_llama(tokenizer)
    add_completion_head(model)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    input_ids, attention_mask, completion_mask, labels = padded_batch(tokenizer)
    with torch.no_grad():
        outputs = completion_head_outputs(copied, input_ids, attention_mask, labels, entropy=False)
        expected, _ = plain_log_softmax(copied, input_ids, attention_mask, completion_mask)
        original, _ = plain_log_softmax(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(outputs.log_probs, expected, rtol=0, atol=2e-6)
    assert not torch.allclose(outputs.log_probs, original, atol=1e-3)


def test_a_copy_that_drops_instance_forwards_gets_the_head_again(tokenizer):
    model = tiny_llama(tokenizer)
    add_completion_head(model)
    snapshot = frozen_copy(model)  # the diagnostics' copy: class forward, own weights
    input_ids, attention_mask, completion_mask, labels = padded_batch(tokenizer)
    outputs = completion_head_outputs(snapshot, input_ids, attention_mask, labels, entropy=False)
    expected, _ = plain_log_softmax(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(outputs.log_probs, expected.detach(), rtol=0, atol=2e-6)


def test_a_batch_without_completion_tokens_gives_a_differentiable_zero(tokenizer):
    model = tiny_llama(tokenizer)
    input_ids, attention_mask, _, _ = padded_batch(tokenizer)
    labels = torch.full_like(input_ids, -100)
    outputs = completion_head_outputs(model, input_ids, attention_mask, labels, entropy=True)
    assert torch.equal(outputs.log_probs, torch.zeros(3, 11))
    outputs.log_probs.sum().backward()
    assert torch.equal(model.lm_head.weight.grad, torch.zeros_like(model.lm_head.weight))


@pytest.mark.parametrize("build", [llama, gemma2_with_softcap, cohere_with_logit_scale])
@pytest.mark.parametrize("tile_elements", [7, lm_head.TILE_ELEMENTS])
def test_mean_logit_and_top1_hit_per_completion_token_equal_the_full_logits(build, tile_elements, tokenizer):
    """TRL's `logits/*` and `mean_token_accuracy` inputs, folded inside the tiles (logit scale and softcap applied)."""
    torch.manual_seed(0)
    model = build(tokenizer)
    input_ids, attention_mask, completion_mask, _ = padded_batch(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        last = attention_mask.sum(1) - 1  # make each row's last token the top-1 prediction (nothing later reads it)
        input_ids[torch.arange(3), last] = logits[torch.arange(3), last - 1].argmax(-1)
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        add_completion_head(model, tile_elements=tile_elements)
        outputs = completion_head_outputs(model, input_ids, attention_mask, labels, entropy=False, metrics=True)
    mask = completion_mask[:, 1:].bool()
    top1 = logits.argmax(-1) == input_ids[:, 1:]
    assert top1[mask].any() and not top1[mask].all(), "a test where every hit is equal checks nothing"
    torch.testing.assert_close(outputs.mean_logits, logits.mean(-1) * mask, rtol=0, atol=2e-6)
    assert torch.equal(outputs.is_top1, top1 & mask)
