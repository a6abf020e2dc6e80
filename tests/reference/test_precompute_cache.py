"""The precompute cache (trl_refpo/reference/precompute.py): its key, its checksum, and recovery from bad files."""

import copy
import errno
import math
import os
import socket
import subprocess
import time

import pytest
import torch
from conftest import ForwardCounter, tiny_args
from safetensors.torch import save_file

from trl_refpo import RefPOTrainer
from trl_refpo.reference import precompute as ref_cache
from trl_refpo.reference.sources import ScoringHandle
from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset


COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_lengths", "ref_rejected_lengths")


def build(model, tokenizer, dataset, tmp_path, eval_dataset=None, ref_model=None, **config):
    return RefPOTrainer(
        model=copy.deepcopy(model),
        ref_model=ref_model,
        args=tiny_args(tmp_path, **config),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


# ---------------------------------------------------------------------------------------------- recovery (issue 11, 8–10)
def cached(model, tokenizer, tmp_path, cache_dir, ref_model):
    counter = ForwardCounter(ref_model)
    trainer = build(
        model,
        tokenizer,
        toy_preference_dataset(8),
        tmp_path,
        ref_model=ref_model,
        loss_type="sigmoid",
        precompute_ref_log_probs=True,
        ref_logps_cache_dir=str(cache_dir),
        max_steps=1,
    )
    return trainer, counter.calls


def columns_of(trainer):
    return {column: torch.tensor(trainer.train_dataset[column]) for column in COLUMNS}


def corrupt(path, how):
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = b""
    elif how == "garbage":
        data = os.urandom(len(data))
    elif how == "flipped payload byte":
        data = data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]
    open(path, "wb").write(data)


@pytest.mark.parametrize(
    "how, reason",
    [
        ("truncated", "unreadable"),
        ("empty", "unreadable"),
        ("garbage", "unreadable"),
        ("flipped payload byte", "checksum mismatch"),
        ("nan values", "non-finite values"),
        ("other key", "its stored key differs"),
    ],
)
def test_a_bad_cache_file_is_reported_rescored_and_replaced(how, reason, model, tokenizer, tmp_path):
    ref_model = tiny_llama(tokenizer, seed=1)
    fresh, calls = cached(model, tokenizer, tmp_path, tmp_path / "cache", ref_model)
    assert calls > 0
    (path,) = (tmp_path / "cache").iterdir()
    if how in ("nan values", "other key"):
        with ref_cache.safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata()
        if how == "nan values":
            tensors["ref_chosen_logps"][3] = math.nan
            metadata["sha256"] = ref_cache.values_checksum(tensors)
        else:
            metadata["key"] = metadata["key"].replace("fp32", "bf16")
        save_file(tensors, str(path), metadata=metadata)
    else:
        corrupt(path, how)
    with pytest.warns(UserWarning, match=f"cache file {path} is unusable \\({reason}"):
        rescored, calls = cached(model, tokenizer, tmp_path, tmp_path / "cache", ref_model)
    assert calls > 0
    for column, value in columns_of(fresh).items():
        torch.testing.assert_close(columns_of(rescored)[column], value, rtol=0, atol=0)
    reloaded, calls = cached(model, tokenizer, tmp_path, tmp_path / "cache", ref_model)  # the file was replaced
    assert calls == 0 and os.listdir(tmp_path / "cache") == [path.name]
    torch.testing.assert_close(columns_of(reloaded)["ref_chosen_logps"], columns_of(fresh)["ref_chosen_logps"])


def test_unwritable_cache_folder_fails_before_scoring(model, tokenizer, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    ref_model = tiny_llama(tokenizer, seed=1)
    counter = ForwardCounter(ref_model)
    with pytest.raises(ValueError, match=f"ref_logps_cache_dir='{not_a_folder}' is not a writable folder"):
        cached(model, tokenizer, tmp_path, not_a_folder, ref_model)
    assert counter.calls == 0


def test_failed_cache_write_keeps_the_scores_warns_and_trains(model, tokenizer, tmp_path, monkeypatch):
    ref_model = tiny_llama(tokenizer, seed=1)
    fresh = build(
        model,
        tokenizer,
        toy_preference_dataset(8),
        tmp_path,
        ref_model=copy.deepcopy(ref_model),
        loss_type="sigmoid",
        precompute_ref_log_probs=True,
    )

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ref_cache, "safetensors_bytes", disk_full)
    expected = "Could not write the reference log-prob cache file .*No space left.*kept in memory"
    with pytest.warns(UserWarning, match=expected):
        trainer, calls = cached(model, tokenizer, tmp_path, tmp_path / "cache", ref_model)
    assert calls > 0 and not [name for name in os.listdir(tmp_path / "cache") if not name.startswith(".")]
    for column, value in columns_of(fresh).items():
        torch.testing.assert_close(columns_of(trainer)[column], value, rtol=0, atol=0)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_cache_write_is_fsynced_before_the_rename_and_stale_temporary_files_are_removed(tmp_path, monkeypatch):
    host = socket.gethostname()
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = tmp_path / f"ref_logps-old.safetensors.{host}.{finished.pid}.tmp"
    live = tmp_path / f"ref_logps-new.safetensors.{host}.{os.getpid()}.tmp"
    old_elsewhere = tmp_path / "ref_logps-x.safetensors.other-host.1.tmp"
    recent_elsewhere = tmp_path / "ref_logps-y.safetensors.other-host.1.tmp"
    for path in (dead, live, old_elsewhere, recent_elsewhere):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_elsewhere, (two_days_ago, two_days_ago))

    cache = ref_cache.RefLogpsCache(str(tmp_path), "k", "key text")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, recent_elsewhere.name])

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ref_cache.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ref_cache.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    values = {column: torch.arange(3, dtype=torch.float32) - 5 for column in COLUMNS}
    cache.save(values, "train")
    assert events == ["fsync", "replace"]
    loaded, problem = cache._read(3)
    assert problem is None and torch.equal(loaded["ref_chosen_logps"], values["ref_chosen_logps"])


# ---------------------------------------------------------------------------------------------- the key
def key_parts(tmp_path, dataset, tokenizer=None, weights="w", **config):
    tokenizer = tokenizer or tiny_tokenizer()
    handle = ScoringHandle(model=None, accelerator=None, tokenizer=tokenizer, weights_fingerprint=lambda: weights)
    args = tiny_args(tmp_path, loss_type="sigmoid", precompute_ref_log_probs=True, **config)
    source = ref_cache.ColumnReference()  # any source without a tokenizer of its own: the policy's is keyed
    return ref_cache.cache_key_parts(source, dataset, args, handle, trl_scored=False)


def test_the_key_changes_with_every_part_and_only_with_them(tmp_path):
    dataset = toy_preference_dataset(8).map(lambda row: {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]})
    base = ref_cache.Hasher.hash(key_parts(tmp_path, dataset))
    assert ref_cache.Hasher.hash(key_parts(tmp_path, dataset)) == base  # deterministic
    other_tokenizer = tiny_tokenizer(extra_words=["zebra"])
    changed = {
        "data": key_parts(tmp_path, dataset.map(lambda row: {"chosen_ids": [5]})),
        "weights": key_parts(tmp_path, dataset, weights="other"),
        "tokenizer": key_parts(tmp_path, dataset, tokenizer=other_tokenizer),
        "max_length": key_parts(tmp_path, dataset, max_length=7),
        "truncation": key_parts(tmp_path, dataset, truncation_mode="keep_end"),
    }
    for part, parts in changed.items():
        assert ref_cache.Hasher.hash(parts) != base, part
    trl_scored = key_parts(tmp_path, dataset) | {"scoring": "trl(ld_alpha=None)"}
    assert ref_cache.Hasher.hash(trl_scored) != base


def test_checksum_covers_names_and_values():
    values = {column: torch.arange(4, dtype=torch.float32) for column in COLUMNS}
    checksum = ref_cache.values_checksum(values)
    assert checksum == ref_cache.values_checksum({name: value.clone() for name, value in values.items()})
    bumped = dict(values, ref_chosen_logps=values["ref_chosen_logps"] + 1e-6)
    assert ref_cache.values_checksum(bumped) != checksum
    renamed = {("ref_x" if name == "ref_chosen_logps" else name): value for name, value in values.items()}
    assert ref_cache.values_checksum(renamed) != checksum
