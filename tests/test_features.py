"""Batching (length grouping, dynamic padding), the tokenisation cache, and checkpoint atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmtune.data.features import (
    LengthGroupedBatchSampler,
    PaddingCollator,
    SortedBatchSampler,
    cached_features,
    features_cache_key,
)
from lmtune.training import checkpoint as ckpt


def _lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, 128, (n,), generator=g).tolist()


def _pad_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


@pytest.mark.parametrize("group", [True, False])
def test_sampler_covers_every_index_once_and_is_deterministic(group: bool) -> None:
    lengths = _lengths(1000)
    s = LengthGroupedBatchSampler(lengths, 32, seed=3, group_by_length=group)
    s.set_epoch(1)
    a = s.batches()
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert len(a) == len(s) == 32
    s.set_epoch(1)
    assert s.batches() == a
    s.set_epoch(2)
    assert s.batches() != a


def test_length_grouping_cuts_padding() -> None:
    lengths = _lengths(4000)
    grouped = LengthGroupedBatchSampler(lengths, 32, seed=0).batches()
    plain = LengthGroupedBatchSampler(lengths, 32, seed=0, group_by_length=False).batches()
    assert _pad_fraction(grouped, lengths) < 0.1 < 0.3 < _pad_fraction(plain, lengths)
    # the longest example comes first, so memory trouble shows at step 1
    assert max(lengths[i] for i in grouped[0]) == max(lengths)


def test_sorted_eval_batches() -> None:
    lengths = [5, 50, 10, 40]
    assert list(SortedBatchSampler(lengths, 2)) == [[1, 3], [2, 0]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_masks(side: str) -> None:
    c = PaddingCollator({"input_ids": 0, "labels": -100}, padding_side=side)
    batch = c([{"input_ids": [5, 6, 7], "labels": [1, 2, 3], "y": 1}, {"input_ids": [8], "labels": [4], "y": 0}])
    assert batch["input_ids"].shape == (2, 3)
    if side == "right":
        assert batch["input_ids"][1].tolist() == [8, 0, 0]
        assert batch["labels"][1].tolist() == [4, -100, -100]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    else:
        assert batch["input_ids"][1].tolist() == [0, 0, 8]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["y"].tolist() == [1, 0]


def test_feature_cache_hits_second_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path))
    from helpers import minilm_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    calls = []

    def build() -> dict:
        calls.append(1)
        return {"input_ids": tok(["a b", "c"])["input_ids"]}

    key = features_cache_key("t", "digest", tok, {"max_length": 8})
    ds1, hit1 = cached_features(key, build)
    ds2, hit2 = cached_features(key, build)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert ds1["input_ids"] == ds2["input_ids"]
    # any change in settings is a different key
    assert features_cache_key("t", "digest", tok, {"max_length": 9}) != key
    assert not list(tmp_path.rglob(".*tmp*"))


class _FakeAccelerator:
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str, safe_serialization: bool = True) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"x" * 10)


def test_checkpoint_is_atomic_and_pruned(tmp_path: Path) -> None:
    acc = _FakeAccelerator()
    for step in (10, 20, 30):
        ckpt.save_checkpoint(acc, tmp_path, step, {"loop": {"step": step}})
    # a crash mid-write leaves only a hidden temporary folder: never picked up
    (tmp_path / ".tmp-step-00000040").mkdir()
    (tmp_path / ".tmp-step-00000040" / "model.safetensors").write_bytes(b"partial")
    # a folder with the final name but no state file (written by something else) is not complete
    (tmp_path / "step-00000050").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000030"
    assert json.loads((tmp_path / "step-00000030" / ckpt.STATE_FILE).read_text())["loop"]["step"] == 30
    ckpt.prune_checkpoints(tmp_path, keep=1, protect={"step-00000010"})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000010", "step-00000030"]
    assert not (tmp_path / ".tmp-step-00000040").exists()


def test_checkpoint_disk_full_keeps_previous(tmp_path: Path) -> None:
    from lmtune.errors import RunError

    acc = _FakeAccelerator()
    ckpt.save_checkpoint(acc, tmp_path, 10, {"loop": {"step": 10}})

    class Full(_FakeAccelerator):
        def save_state(self, path: str, safe_serialization: bool = True) -> None:
            Path(path).mkdir(parents=True, exist_ok=True)
            raise OSError(28, "No space left on device")

    with pytest.raises(RunError, match="No space left"):
        ckpt.save_checkpoint(Full(), tmp_path, 20, {"loop": {"step": 20}})
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"
    assert not list(tmp_path.glob(".tmp-*"))
