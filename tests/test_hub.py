"""Hub ids (``model: org/name``) through huggingface_hub's own cache, offline: a tiny model saved in the Hub
cache layout (blobs/, snapshots/<commit>/, refs/) in a temporary HF_HUB_CACHE, and no network at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, sentiment_rows, write_csv
from huggingface_hub import constants

import lmtune
from lmtune.config.schema import ModelConfig
from lmtune.errors import ModelError
from lmtune.models.hub import fetch_command, files_to_download, is_hub_id, snapshot_of
from lmtune.models.registry import model_path_of, resolve_model

REPO = "lmtune-test/tiny-bert"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Copy ``folder`` into ``cache`` as huggingface_hub lays out a downloaded snapshot: the files as blobs
    named by their hash, the snapshot's entries as relative links to them, and ``refs`` pointing at ``commit``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test (huggingface_hub reads HF_HUB_CACHE once, at import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cut_network(mp: pytest.MonkeyPatch) -> list[Any]:
    """Make every attempt to open a network connection or look up a host name fail; the attempts are recorded."""
    tried: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        tried.append(args)
        raise OSError("network use in a test that must stay offline")

    mp.setattr(socket, "getaddrinfo", refuse)
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    return tried


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """No network in this test: attempts fail, and are recorded for the test to assert there were none."""
    return _cut_network(monkeypatch)


@pytest.fixture(scope="module")
def hub_run(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Any, Path]]:
    """A LoRA run trained from ``model: lmtune-test/tiny-bert``, found only in a temporary Hub cache (whose
    model card says ``license: mit``), with the network cut; (run, its snapshot folder)."""
    tmp = tmp_path_factory.mktemp("hub-run")
    source = tmp / "tiny-bert"
    shutil.copytree(tiny_bert_dir, source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# tiny-bert\n")
    cache = tmp / "hf-cache"
    snapshot = put_in_hub_cache(cache, REPO, source, COMMIT_A)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        tried = _cut_network(mp)
        run = lmtune.train({
            "task": "classification", "model": REPO, "method": {"name": "lora"},
            "data": {"train": str(sentiment_csv), "max_length": 32},
            "train": {"epochs": 6, "batch_size": 16, "learning_rate": 5e-3, "precision": "fp32", "log_every": 5},
            "output_dir": str(tmp / "run"),
        }, show_progress=False)
        assert not tried
    yield run, snapshot


def test_a_hub_id_trains_from_the_cache_and_the_run_records_its_commit(hub_run: tuple[Any, Path],
                                                                       no_network: list[Any]) -> None:
    run, snapshot = hub_run
    # it trained for real from the cached snapshot
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0]
    assert run.metrics["test"]["accuracy"] > run.metrics["starting_point"]["test"]["accuracy"]
    record = {"repo_id": REPO, "revision": "main", "commit": COMMIT_A}
    assert json.loads((run.path / "run.json").read_text())["base_model_hub"] == record
    meta = json.loads((run.model_dir / "lmtune.json").read_text())
    assert meta["base_model_hub"] == record and meta["base_model"] == REPO
    assert meta["base_model_path"] == str(snapshot.resolve())
    assert COMMIT_A in (run.path / "report.md").read_text()
    # the saved (merged) model is a local folder: reloading it needs neither the Hub nor the cache
    hidden = snapshot.parent.parent.with_name("moved-away")
    snapshot.parent.parent.rename(hidden)
    try:
        fresh = lmtune.load_run(run.path)
        labels = [p["label"] for p in fresh.predict(["great wonderful brilliant film", "dull awful boring plot"])]
    finally:
        hidden.rename(snapshot.parent.parent)
    assert labels == [p["label"] for p in run.predict(["great wonderful brilliant film", "dull awful boring plot"])]
    assert not no_network


def test_revision_chooses_the_snapshot(tiny_bert_dir: Path, hub_cache: Path, no_network: list[Any]) -> None:
    put_in_hub_cache(hub_cache, REPO, tiny_bert_dir, COMMIT_A)
    put_in_hub_cache(hub_cache, REPO, tiny_bert_dir, COMMIT_B, refs=("v1",))

    def resolved(revision: str | None) -> str:
        path = model_path_of(ModelConfig(name=REPO, revision=revision))
        hub = snapshot_of(path, revision)
        assert hub is not None and hub.repo_id == REPO
        return hub.commit

    assert resolved(None) == COMMIT_A
    assert resolved("main") == COMMIT_A
    assert resolved("v1") == COMMIT_B  # a tag, through refs/
    assert resolved(COMMIT_B) == COMMIT_B  # a commit, straight to its snapshot
    with pytest.raises(ModelError, match="at revision 'v2' is not in the Hugging Face cache"):
        resolved("v2")
    assert not no_network


def test_a_missing_hub_id_offline_says_how_to_fetch_it(hub_cache: Path, tmp_path: Path, no_network: list[Any],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = write_csv(tmp_path / "s.csv", sentiment_rows(40))
    config = tmp_path / "c.yaml"
    config.write_text(f"task: classification\nmodel: lmtune-test/missing\ndata: {{train: {data}}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert run_cli(["train", str(config)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "lmtune-test/missing is not in the Hugging Face cache" in " ".join(err.split())
    assert "hf download lmtune-test/missing" in err and "model.download: true" in err
    assert "Traceback" not in err
    # download asked for, but the user's HF_HUB_OFFLINE=1 (conftest) wins, still without touching the network
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE=1 is set, which wins over model\.download"):
        model_path_of(ModelConfig(name="lmtune-test/missing", download=True))
    assert not no_network


def test_a_snapshot_with_only_pickled_weights_is_refused(tiny_bert_dir: Path, hub_cache: Path,
                                                        tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert_dir / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    put_in_hub_cache(hub_cache, "lmtune-test/pickled", pickled, COMMIT_A)
    # allow_pickle, a setting for files the user made, does not extend to a Hub model
    with pytest.raises(ModelError, match=r"refusing pickled weights \(pytorch_model.bin\)") as err:
        model_path_of(ModelConfig(name="lmtune-test/pickled", allow_pickle=True))
    assert "safetensors only" in str(err.value)


def test_how_a_model_string_is_told_apart(tiny_bert_dir: Path, hub_cache: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    put_in_hub_cache(hub_cache, REPO, tiny_bert_dir, COMMIT_A)
    assert is_hub_id(REPO) and not is_hub_id("./a/b") and not is_hub_id("/abs/path") and not is_hub_id("minilm")
    # an existing folder spelled like an id is that folder
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert_dir, tmp_path / REPO)
    assert resolve_model(REPO) == (tmp_path / REPO).resolve()
    with pytest.raises(ModelError, match=r"model\.revision applies to Hub models"):
        resolve_model(REPO, revision="main")
    shutil.rmtree(tmp_path / REPO)
    assert snapshot_of(resolve_model(REPO)) is not None
    # a bundled name is the bundled model; a revision there is a mistake, not ignored
    with pytest.raises(ModelError, match="is the bundled model minilm"):
        resolve_model("minilm", revision="main")
    # code from the Hub never runs
    with pytest.raises(ModelError, match="trust_remote_code is refused for the Hub model"):
        model_path_of(ModelConfig(name=REPO, trust_remote_code=True))


def test_a_download_fetches_only_what_lmtune_loads() -> None:
    # the files of a typical Hub repository that ships several formats
    files = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
             "flax_model.msgpack", "training_args.pt", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "merges.txt", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "README.md",
             "modeling_custom.py", "onnx/model.onnx", "onnx/config.json", "original/consolidated.safetensors",
             ".gitattributes", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    wanted = files_to_download(files)
    assert set(wanted) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json", "vocab.txt", "merges.txt", "tokenizer.model",
                           "special_tokens_map.json", "chat_template.jinja", "README.md",
                           "model.safetensors.index.json", "model-00001-of-00002.safetensors"}
    assert "hf download org/name --revision v1 --include '*.safetensors'" in fetch_command("org/name", "v1")


def test_an_unreachable_hub_falls_back_to_the_cache_or_fails_clearly(
        tiny_bert_dir: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # downloads allowed (HF_HUB_OFFLINE unset, model.download true), but the Hub is a closed local port
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    put_in_hub_cache(hub_cache, REPO, tiny_bert_dir, COMMIT_A)
    assert snapshot_of(model_path_of(ModelConfig(name=REPO, download=True))).commit == COMMIT_A  # type: ignore[union-attr]
    with pytest.raises(ModelError, match="the Hub could not be reached") as err:
        model_path_of(ModelConfig(name="lmtune-test/missing", download=True))
    assert "hf download lmtune-test/missing" in str(err.value)


# ------------------------------------------------------------------------------------------- lmtune push
def test_push_dry_run_lists_each_file_and_the_card_metadata(hub_run: tuple[Any, Path], no_network: list[Any],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = hub_run
    assert run_cli(["push", str(run.path), "--repo", "me/tiny-sentiment", "--dry-run"], monkeypatch) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "lmtune.json"):
        size = (run.model_dir / name).stat().st_size
        row = next(line for line in lines if line.strip().startswith(name + " "))
        assert str(run.model_dir / name) in row
        assert (f"{size} B" if size < 1024 else f"{size / 1024:.1f} KB" if size < 1024 ** 2
                else f"{size / 1024 ** 2:.1f} MB") in row
    assert any(line.strip().startswith("README.md") and "(written by lmtune)" in line for line in lines)
    assert "https://huggingface.co/me/tiny-sentiment in one commit" in out
    for meta in ("library_name: transformers", f"base_model: {REPO}", "license: mit", "model-index:"):
        assert meta in out
    assert not no_network


def test_the_pushed_card_parses_back_with_the_run_metrics(hub_run: tuple[Any, Path], sentiment_csv: Path) -> None:
    from huggingface_hub import ModelCard, metadata_load

    from lmtune.workflows.push import plan_push

    run, _ = hub_run
    plan = plan_push(run.path, "me/tiny-sentiment")
    card = ModelCard(next(f.content for f in plan.files if f.repo_path == "README.md").decode())
    assert card.data.library_name == "transformers" and card.data.base_model == REPO
    assert card.data.license == "mit" and {"lmtune", "classification", "lora"} <= set(card.data.tags)
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scores["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])
    assert {(r.dataset_split, r.dataset_name) for r in card.data.eval_results} == {("test", "sentiment.csv")}
    # the card names data files, never this machine's folders (the run trained from a file under tmp)
    assert "- train: `sentiment.csv`" in card.text and str(sentiment_csv.parent) not in card.content
    # the card in the run folder is the same metadata, as the Hub's own parser reads it
    assert metadata_load(run.model_dir / "README.md")["model-index"][0]["results"][0]["metrics"][0]["value"] == \
        pytest.approx(run.metrics["test"]["accuracy"])
    assert {f.repo_path for f in plan.files} >= {"model.safetensors", "config.json", "lmtune.json", "README.md"}
    # the commit's operations (huggingface_hub hashes each file as it builds them) carry what the listing shows
    ops = [f.operation() for f in plan.files]
    assert [(op.path_in_repo, op.upload_info.size) for op in ops] == [(f.repo_path, f.size) for f in plan.files]
    # --adapter: only the adapter, marked for peft, its base the Hub id instead of a path on this machine
    adapter = plan_push(run.path, "me/tiny-sentiment-lora", adapter=True)
    paths = {f.repo_path for f in adapter.files}
    assert "adapter_model.safetensors" in paths and "model.safetensors" not in paths
    assert adapter.metadata["library_name"] == "peft" and adapter.metadata["base_model"] == REPO
    config = json.loads(next(f.content for f in adapter.files if f.repo_path == "adapter_config.json"))
    assert config["base_model_name_or_path"] == REPO


def test_push_fails_before_uploading_anything(hub_run: tuple[Any, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import HfApi

    run, _ = hub_run
    calls: list[str] = []
    for method in ("create_repo", "create_commit", "upload_folder"):  # recorded, then the real method runs
        original = getattr(HfApi, method)
        monkeypatch.setattr(HfApi, method, lambda self, *a, _m=method, _o=original, **k: (calls.append(_m),
                                                                                           _o(self, *a, **k))[1])
    args = ["push", str(run.path), "--repo", "me/tiny-sentiment"]
    # offline by the user's choice (conftest sets HF_HUB_OFFLINE=1): refused at once, no network at all
    tried = _cut_network(monkeypatch)
    assert run_cli(args, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1 is set" in err and "nothing was uploaded" in err and "Traceback" not in err
    assert not tried
    monkeypatch.undo()
    # online but no token anywhere
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert run_cli(args, monkeypatch) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    # a token, but the Hub does not answer (a closed local port): the token check fails, nothing else is tried
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_printed")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for method in ("create_repo", "create_commit", "upload_folder"):
        original = getattr(HfApi, method)
        monkeypatch.setattr(HfApi, method, lambda self, *a, _m=method, _o=original, **k: (calls.append(_m),
                                                                                           _o(self, *a, **k))[1])
    assert run_cli(args, monkeypatch) == 2
    captured = capsys.readouterr()
    assert "cannot reach the Hugging Face Hub while checking the token" in captured.err
    assert "hf_secret_never_printed" not in captured.err + captured.out
    assert calls == []  # no repository created, no commit started
