"""The adapter store: names, validation against the base (fail closed), LRU, hot add/remove."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_llama

from nora.checkpoint import CheckpointError
from nora.serving import (
    AdapterBusyError,
    AdapterNameError,
    AdapterStore,
    MultiAdapterModel,
    StoreFullError,
    UnknownAdapterError,
)
from serving.common import random_ids, save_random, solo


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "adapters"
    for i, (name, method) in enumerate([("a", "nora"), ("b", "lora"), ("c", "aurora")]):
        save_random(root / name, seed=i, method=method, r=2 + i)
    return root


@pytest.fixture
def store(root):
    return AdapterStore(MultiAdapterModel(tiny_llama()), root, max_resident=2)


@pytest.mark.parametrize(
    "name",
    ["../a", "a/b", "a\\b", "..", ".", ".hidden", "", "/etc/passwd", "a..b", "x" * 129, None, 3],
)
def test_names_that_could_address_other_paths_are_refused(store, name):
    with pytest.raises(AdapterNameError):
        store.load(name)
    assert store.resident() == []


def test_symlinks_leading_outside_the_directory_are_refused(store, root, tmp_path):
    outside = tmp_path / "outside"
    save_random(outside, method="nora", r=2)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterNameError, match="outside"):
        store.load("escape")
    (root / "d").mkdir()
    (root / "d" / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    shutil.copy(outside / "adapter_model.safetensors", root / "d")
    with pytest.raises(AdapterNameError, match="outside"):
        store.load("d")
    (root / "inside").symlink_to(root / "a", target_is_directory=True)  # stays inside: fine
    assert store.load("inside").method == "nora"


def test_unknown_adapter_names_the_known_ones(store):
    with pytest.raises(UnknownAdapterError) as e:
        store.load("nope")
    assert e.value.known == ["a", "b", "c"] and "a, b, c" in str(e.value)


def test_shape_mismatch_is_refused_with_the_tensor_named(store, root):
    save_random(root / "wide", base=lambda: tiny_llama(hidden=48), method="nora", r=2)
    with pytest.raises(CheckpointError) as e:
        store.load("wide")
    msg = str(e.value)
    assert "'wide'" in msg and "model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "model expects shape (2, 32), file has (2, 48)" in msg
    assert store.resident() == [] and not store.multi.layers()  # nothing changed


def _retarget(_, path, targets):
    f = path / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "target_modules": targets}))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: _retarget(save_random(p, method="lora"), p, ["c_attn"]), "matched no module"),
        (lambda p: save_random(p, method="nora", placement="module"), "placement 'module'"),
        (lambda p: save_random(p, method="lora", layers_to_transform=[1]), None),
    ],
)
def test_adapters_that_do_not_fit_fail_closed(store, root, make, match):
    make(root / "x")
    if match is None:  # the control case: a valid adapter loads
        assert store.load("x").r == 8
        return
    with pytest.raises(CheckpointError, match=match):
        store.load("x")
    assert "x" not in store.resident()


def test_corrupt_missing_or_non_finite_files_fail_closed(store, root):
    shutil.copytree(root / "a", root / "trunc")
    f = root / "trunc" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        store.load("trunc")
    shutil.copytree(root / "a", root / "typo")
    cfg = json.loads((root / "typo" / "adapter_config.json").read_text())
    (root / "typo" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type"):
        store.load("typo")
    from safetensors.torch import load_file, save_file

    shutil.copytree(root / "a", root / "nan")
    t = load_file(root / "nan" / "adapter_model.safetensors")
    k = sorted(t)[0]
    t[k][0, 0] = float("nan")
    save_file(t, root / "nan" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        store.load("nan")
    assert store.resident() == []


def test_lru_eviction_keeps_at_most_max_resident(store):
    store.load("a")
    store.load("b")
    store.load("a")  # a is now the most recent
    store.load("c")  # evicts b
    assert store.resident() == ["a", "c"] and store.evictions == 1
    assert sorted(store.multi.adapters) == ["a", "c"]
    assert all(len(layer.adapters) == 2 for layer in store.multi.layers().values())


def test_a_load_reads_the_disk_without_the_model_lock(store, monkeypatch):
    """Requests keep decoding while an adapter is read; never more than max_resident live."""
    import threading

    import nora.serving.multi as multi_mod

    store.load("a")
    store.load("b")
    reading, go = threading.Event(), threading.Event()
    real = multi_mod.read_weights

    def slow_read(path):
        reading.set()
        assert go.wait(30)
        return real(path)

    monkeypatch.setattr(multi_mod, "read_weights", slow_read)
    live = []
    real_install = store.multi.install
    monkeypatch.setattr(
        store.multi, "install", lambda p: live.append(len(store.multi.adapters)) or real_install(p)
    )
    t = threading.Thread(target=store.load, args=("c",))
    t.start()
    assert reading.wait(30)
    # the loader is in the middle of its disk read: the engine's lock is free
    got = store.lock.acquire(timeout=5)
    assert got
    store.lock.release()
    assert store.resident() == ["a", "b"]  # nothing evicted before the read succeeded
    go.set()
    t.join(30)
    assert store.resident() == ["b", "c"] and live == [1]  # "a" left before "c" came in


def test_two_threads_loading_one_adapter_get_the_same_one(store, monkeypatch):
    import threading

    import nora.serving.multi as multi_mod

    both, real = threading.Barrier(2, timeout=30), multi_mod.read_weights

    def read_together(path):  # both loaders are past the first check before either installs
        both.wait()
        return real(path)

    monkeypatch.setattr(multi_mod, "read_weights", read_together)
    got, errors = [], []

    def load():
        try:
            got.append(store.load("a").uid)
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(got) == 2 and got[0] == got[1]
    assert store.resident() == ["a"] and store.loads == 1


def test_pinned_adapters_are_never_evicted_or_unloaded(store):
    store.acquire("a")
    store.acquire("b")
    with pytest.raises(StoreFullError):
        store.load("c")
    with pytest.raises(AdapterBusyError, match="in use by 1"):
        store.unload("a")
    store.release("a")
    store.load("c")  # a was released: it is the one evicted
    assert store.resident() == ["b", "c"]
    store.release("b")
    store.unload("b")
    with pytest.raises(UnknownAdapterError):
        store.unload("b")


def test_adapters_added_and_removed_while_serving(store, root):
    ids = random_ids(2, 5)
    assert store.available() == ["a", "b", "c"]
    save_random(root / "new", seed=9, method="nolora", r=3)  # appears after start-up
    assert "new" in store.available()
    store.load("new")
    with torch.no_grad():
        out = store.multi(ids, adapters=["new", None]).logits
    assert torch.allclose(out[0], solo(root, "new", ids[:1])[0], atol=1e-5, rtol=1e-4)
    store.unload("new")
    shutil.rmtree(root / "new")
    assert "new" not in store.available()
    with pytest.raises(UnknownAdapterError):
        store.load("new")
