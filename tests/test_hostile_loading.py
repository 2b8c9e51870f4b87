"""One loading path for every verb (issue 13, item 3): a model folder whose weights are only a pickle
(``pytorch_model.bin``) is refused by ``predict`` and ``serve`` as ``train`` refuses it, with an lmtune
error that names the file and says how to convert it, never a traceback; a malicious pickle never runs.

``train`` may opt in (``model.allow_pickle``, for a base model the user made); a saved model has no
opt-in: lmtune always saves safetensors, and a run folder's own settings come from whoever handed it over.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from lmtune.errors import ModelError
from lmtune.models.loading import load_pretrained, load_saved_adapter, load_saved_model
from lmtune.tasks.base import get_predictor

# task -> (transformers class the saved model loads with, fixture of the tiny model to start from, meta)
PREDICTORS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "classification": (AutoModelForSequenceClassification, "tiny_bert_nodrop_dir", {}),
    "token_classification": (AutoModelForTokenClassification, "tiny_bert_nodrop_dir", {}),
    "question_answering": (AutoModelForQuestionAnswering, "tiny_bert_nodrop_dir", {}),
    "seq2seq": (AutoModelForSeq2SeqLM, "tiny_t5_dir", {"route": "encoder_decoder"}),
}


class _Payload:
    """Unpickling this creates ``path``: what an attacker's ``pytorch_model.bin`` would do (worse)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def _pickled_folder(folder: Path, model_class: Any, source: Path, task: str, meta: dict[str, Any]) -> Path:
    """A saved model folder as lmtune writes one (config, tokenizer, lmtune.json), with the weights as
    ``pytorch_model.bin`` (a plain torch.save of the state dict) instead of ``model.safetensors``."""
    model = model_class.from_pretrained(source)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    (folder / "lmtune.json").write_text(json.dumps({"task": task, **meta}), encoding="utf-8")
    assert not list(folder.glob("*.safetensors"))
    return folder


@pytest.mark.parametrize("task", list(PREDICTORS))
def test_every_predictor_refuses_pickled_weights(task: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model_class, fixture, meta = PREDICTORS[task]
    folder = _pickled_folder(tmp_path / "model", model_class, request.getfixturevalue(fixture), task, meta)
    with pytest.raises(ModelError, match=r"refusing pickled weights \(pytorch_model\.bin\)") as err:
        get_predictor(task)(folder, {"task": task, **meta})
    assert err.value.file == str(folder)
    hint = err.value.hint or ""
    # how to convert, with the class that loads this model; no training setting to flip
    assert f"{model_class.__name__}.from_pretrained" in hint and "safetensors" in hint
    assert "model.allow_pickle" not in hint


def test_a_malicious_pickle_never_runs(tmp_path: Path, tiny_bert_nodrop_dir: Path) -> None:
    folder = _pickled_folder(tmp_path / "model", AutoModelForSequenceClassification, tiny_bert_nodrop_dir,
                             "classification", {})
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError, match="refusing pickled weights"):
        get_predictor("classification")(folder, {"task": "classification"})
    assert not marker.exists()


def _lmtune(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmtune", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_predict_and_serve_refuse_a_pickled_model_folder_as_train_does(tmp_path: Path,
                                                                       tiny_bert_nodrop_dir: Path) -> None:
    """The same folder through the three verbs: one refusal, an lmtune error and no traceback, and the
    malicious pickle in it never runs."""
    folder = _pickled_folder(tmp_path / "model", AutoModelForSequenceClassification, tiny_bert_nodrop_dir,
                             "classification", {})
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    texts = tmp_path / "in.csv"
    texts.write_text("text\na fine film\n", encoding="utf-8")
    for args in (["predict", str(folder), "-i", str(texts), "-o", str(tmp_path / "out.csv"), "--no-progress"],
                 ["serve", str(folder), "--port", "0"]):
        proc = _lmtune(*args)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert "refusing pickled weights (pytorch_model.bin)" in out and "safetensors" in out, out[-3000:]
        assert not marker.exists()
    # train refuses it too (as a base model), and says how to opt in for a file the user made
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps({"model": str(folder), "data": {"train": str(texts)},
                               "output_dir": str(tmp_path / "run")}), encoding="utf-8")
    proc = _lmtune("train", str(cfg), "--no-progress")
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "refusing pickled weights (pytorch_model.bin)" in proc.stdout + proc.stderr
    assert "model.allow_pickle" in proc.stdout + proc.stderr
    assert not marker.exists()


def test_training_opts_in_and_saved_models_do_not(tmp_path: Path, tiny_bert_nodrop_dir: Path) -> None:
    """The one loading helper: ``allow_pickle`` reads a pickle the user vouched for (training's
    ``model.allow_pickle``); without it, or for a saved model, only safetensors."""
    folder = _pickled_folder(tmp_path / "model", AutoModelForSequenceClassification, tiny_bert_nodrop_dir,
                             "classification", {})
    model = load_pretrained(AutoModelForSequenceClassification, folder, allow_pickle=True, dtype=torch.float32)
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with pytest.raises(ModelError, match=r"model\.allow_pickle"):
        load_pretrained(AutoModelForSequenceClassification, folder)
    with pytest.raises(ModelError, match="refusing pickled weights"):
        load_saved_model(AutoModelForSequenceClassification, folder)
    # a safetensors file beside the pickle: the safetensors weights load, the pickle is never read
    model.save_pretrained(tmp_path / "both")
    (tmp_path / "both" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    load_saved_model(AutoModelForSequenceClassification, tmp_path / "both")
    assert not (tmp_path / "pwned").exists()


def test_a_broken_saved_model_is_an_lmtune_error(tmp_path: Path, tiny_bert_nodrop_dir: Path) -> None:
    """Truncated safetensors or a config transformers cannot read: a ModelError naming the folder."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_nodrop_dir)
    model.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load the classification model") as err:
        load_saved_model(AutoModelForSequenceClassification, tmp_path / "cut", error="cannot load the classification model")
    assert err.value.file == str(tmp_path / "cut")


def test_a_pickled_decoder_folder_is_refused(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """Generative runs (``lmtune serve``/``chat``/``predict`` on an sft model) load safetensors only too."""
    from lmtune.workflows.run import Run

    folder = tmp_path / "decoder"
    AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir).config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_chat_llama_dir).save_pretrained(folder)
    (folder / "lmtune.json").write_text(json.dumps({"task": "sft"}), encoding="utf-8")
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError, match="safetensors"):
        Run.load(folder).generator()
    assert not marker.exists()
    with pytest.raises(ModelError, match="refusing pickled weights"):
        load_saved_model(AutoModelForCausalLM, folder)


def test_a_pickled_adapter_is_refused(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """peft would read ``adapter_model.bin`` with torch.load: the adapter helper refuses it first."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    assert load_saved_adapter(fresh, tmp_path / "adapter").peft_config
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError, match=r"refusing pickled weights \(adapter_model\.bin\)"):
        load_saved_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir), tmp_path / "adapter")
    assert not marker.exists()
