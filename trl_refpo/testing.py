"""Tiny in-code models, tokenizers and preference data, for tests, benchmarks and the quickstart.

Nothing here downloads anything: tokenizers are built with ``tokenizers`` (WordLevel) and wrapped in
``PreTrainedTokenizerFast``; models are random ``LlamaForCausalLM`` from a config.
"""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
LETTERS = list("abcdefgh")
DIGITS = [str(d) for d in range(10)]
WORDS = ["sort", "reverse", "copy", "count", "to", ":", "user", "assistant", "yes", "no", "the", "answer", "is"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '> ' + message['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def tiny_tokenizer(extra_words: list[str] | None = None, with_chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer over a small fixed vocabulary (plus ``extra_words``)."""
    vocab_words = (
        SPECIAL_TOKENS + ["<user>", "<assistant>", "<system>"] + LETTERS + DIGITS + WORDS + (extra_words or [])
    )
    vocab = {word: index for index, word in enumerate(dict.fromkeys(vocab_words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, vocab_size: int | None = None):
    """A random Llama small enough to train in seconds on a CPU."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_tiny_llama(folder, tokenizer, seed: int = 0) -> str:
    """Save :func:`tiny_llama` over ``tokenizer``, with the tokenizer, as a model folder (for paths in recipes)."""
    tiny_llama(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def toy_preference_dataset(num_examples: int = 64, seed: int = 0, conversational: bool = False) -> Dataset:
    """Sort / reverse / copy tasks over letters: ``chosen`` solves the task, ``rejected`` does not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        task = rng.choice(["sort", "reverse", "copy"])
        letters = rng.sample(LETTERS, rng.randint(2, 5))
        correct = {"sort": sorted(letters), "reverse": letters[::-1], "copy": letters}[task]
        wrong = list(correct)
        while wrong == correct:
            rng.shuffle(wrong)
        prompt = f"{task} : {' '.join(letters)}"
        chosen, rejected = " ".join(correct), " ".join(wrong)
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": prompt + " :", "chosen": " " + chosen, "rejected": " " + rejected})
    return Dataset.from_list(rows)


# A second tokenizer, different from ``tiny_tokenizer`` in ids, boundaries, special tokens and chat template.
BPE_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
BPE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '</s>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_bpe_tokenizer(vocab_size: int = 96, with_chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A character-level BPE tokenizer trained in code on the toy task texts, with no pre-tokenizer.

    Its merges cross spaces (e.g. ``": a"``), so its token boundary between a prompt and its completion often
    differs from ``tiny_tokenizer``'s; it adds its own BOS ``<s>`` and ends sequences with ``</s>``.
    """
    from tokenizers import decoders, processors, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    alphabet = sorted(set(" :" + "".join(LETTERS + DIGITS + WORDS)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=BPE_SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    dataset = toy_preference_dataset(num_examples=256, seed=123)
    corpus = [row["prompt"] + row["chosen"] for row in dataset] + [row["prompt"] + row["rejected"] for row in dataset]
    backend.train_from_iterator(corpus, trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if with_chat_template:
        tokenizer.chat_template = BPE_CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(family: str, tokenizer, seed: int = 0):
    """A random tiny causal LM of ``family`` (``llama``, ``qwen2``, ``gemma2`` (final-logit softcap), ``cohere`` (logit
    scale), ``lfm2`` / ``nemotron_h`` (hybrid convolution / Mamba), ``qwen3_moe`` / ``gpt_oss`` (mixture of experts,
    router loss on)), built from a config on the tokenizer's vocabulary."""
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    moe = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01)
    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=2.0)),
        "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
        "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),
        "nemotron_h": (
            "NemotronHConfig",
            "NemotronHForCausalLM",
            dict(
                layers_block_type=["mamba", "attention"],
                head_dim=8,
                mamba_num_heads=4,
                mamba_head_dim=16,
                ssm_state_size=8,
                n_groups=1,
                chunk_size=16,
            ),
        ),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=32, num_experts=4, **moe)),
        "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=8, num_local_experts=4, **moe)),
    }
    config_name, model_name, extra = configs[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**common, **extra})
    return getattr(transformers, model_name)(config)


IMAGE_TOKEN = "<image>"


def tiny_llava(seed: int = 0, image_size: int = 16, patch_size: int = 4):
    """A random tiny Llava (CLIP vision tower, projector, Llama text model) and its processor, built in code.

    The processor expands each ``<image>`` of a prompt into ``(image_size / patch_size)² + 1`` image tokens."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text_config = tiny_llama(tokenizer).config
    vision_config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
    )
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


def toy_vision_preference_dataset(num_examples: int = 16, seed: int = 0, image_size: int = 16) -> Dataset:
    """:func:`toy_preference_dataset` with one random RGB image per example, ``<image>`` opening each prompt."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = toy_preference_dataset(num_examples, seed=seed).to_list()
    for row in rows:
        row["prompt"] = f"{IMAGE_TOKEN} {row['prompt']}"
        row["images"] = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))]
    return Dataset.from_list(rows)
