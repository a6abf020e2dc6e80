"""Fingerprints of what shapes reference scoring, shared by the precompute cache key and the re-tokenisation map
(``datasets.map`` would otherwise fingerprint its function's arguments by dill-pickling whole tokenizers).
"""

from __future__ import annotations

from datasets.fingerprint import Hasher


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": [
            str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        ],
        "chat_template": tokenizer.chat_template,
    }
    return Hasher.hash(parts)
