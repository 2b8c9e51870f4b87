"""`export_merged`: a run's model as one standalone folder, checked against the model as trained.

Run folders are built here from tiny models (no training): a LoRA adapter with random non-zero B
matrices changes the outputs, so a merge that dropped or mangled it would show in the logits.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from lmtune.errors import RunError
from lmtune.models import export
from lmtune.workflows.export import export_merged


def _randomise_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    # peft initialises lora_B to zero (adapter = identity); a trained adapter is not.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _write_meta(model_dir: Path, **meta: object) -> None:
    (model_dir / "lmtune.json").write_text(json.dumps(meta), encoding="utf-8")
    (model_dir / "README.md").write_text("# test model card\n", encoding="utf-8")


@pytest.fixture(scope="module")
def lora_llama_run(tmp_path_factory: pytest.TempPathFactory, tiny_chat_llama_dir: Path) -> Path:
    """A LoRA causal-LM run: adapter/ (random non-zero B) and model/ (merged), as train writes them."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path_factory.mktemp("lora-llama-run")
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4))
    _randomise_lora_b(model)
    model.save_pretrained(run / "adapter", safe_serialization=True)
    copy.deepcopy(model).merge_and_unload().save_pretrained(run / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_chat_llama_dir).save_pretrained(run / "model")
    _write_meta(run / "model", task="sft", method="lora", base_model_path=str(tiny_chat_llama_dir),
                saved_as="merged")
    return run


@pytest.fixture(scope="module")
def full_bert_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A fully fine-tuned classification run: model/ only, no adapter."""
    run = tmp_path_factory.mktemp("full-bert-run")
    torch.manual_seed(1)
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3, dtype=torch.float32)
    model.save_pretrained(run / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(run / "model")
    _write_meta(run / "model", task="classification", method="full", base_model_path=str(tiny_bert_dir),
                saved_as="full", labels=["a", "b", "c"])
    return run


def _peft_reference(run: Path, base_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run / "adapter")).eval()


def test_lora_causal_lm_export_matches_unmerged_adapter(
    lora_llama_run: Path, tiny_chat_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exported"
    result = export_merged(lora_llama_run, out)

    assert result.folder == out.resolve() and result.source == "adapter"
    assert result.prompts == len(export.DEFAULT_PROMPTS) + export.CHAT_PROMPTS
    assert result.max_abs_logit_diff <= 1e-5 and result.tolerance == export.DEFAULT_TOLERANCE
    assert not (tmp_path / ".exported.tmp").exists()
    facts = json.loads((out / "export.json").read_text())
    assert facts["max_abs_logit_diff"] == result.max_abs_logit_diff and facts["source"] == "adapter"
    meta = json.loads((out / "lmtune.json").read_text())
    assert meta["task"] == "sft" and meta["saved_as"] == "merged" and meta["exported"]["prompts"] == result.prompts
    assert (out / "README.md").is_file() and (out / "generation_config.json").is_file()
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()

    # Plain transformers, no peft: same greedy continuation as the unmerged adapter model.
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    reference = _peft_reference(lora_llama_run, tiny_chat_llama_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        assert torch.equal(reloaded.generate(**ids, **kwargs), reference.generate(**ids, **kwargs))
        # The adapter matters: the base model alone answers differently (else the test proves nothing).
        base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
        assert (base(**ids).logits - reloaded(**ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("saved_as", ["merged", "adapter"])
def test_lora_classifier_export_carries_trained_head(tiny_bert_dir: Path, tmp_path: Path, saved_as: str) -> None:
    """The head lives in the adapter's modules_to_save; the base only has a random one.

    ``adapter``: the run kept only the adapter in model/ (no config.json), so the labels come from lmtune.json.
    """
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    torch.manual_seed(2)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3, dtype=torch.float32)
    lora = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], modules_to_save=["classifier"],
                      exclude_modules=["classifier"], r=4)
    model = get_peft_model(base, lora)
    _randomise_lora_b(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    if saved_as == "merged":
        model.save_pretrained(run / "adapter", safe_serialization=True)
        copy.deepcopy(model).merge_and_unload().save_pretrained(run / "model", safe_serialization=True)
    else:
        model.save_pretrained(run / "model", safe_serialization=True)
        assert not (run / "model" / "config.json").exists()
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(run / "model")
    _write_meta(run / "model", task="classification", method="lora", base_model_path=str(tiny_bert_dir),
                saved_as=saved_as, labels=["x", "y", "z"])

    result = export_merged(run, tmp_path / "out")

    assert result.source == "adapter" and result.max_abs_logit_diff <= 1e-4
    ids = AutoTokenizer.from_pretrained(tmp_path / "out")("a fine film", return_tensors="pt")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_labels == 3
    assert json.loads((tmp_path / "out" / "lmtune.json").read_text())["saved_as"] == "merged"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model.eval()(**ids).logits, rtol=0, atol=1e-5)


def test_full_classification_export_is_exact(full_bert_run: Path, tmp_path: Path) -> None:
    result = export_merged(full_bert_run, tmp_path / "out")

    assert result.source == "model" and result.max_abs_logit_diff == 0.0
    assert result.prompts == len(export.DEFAULT_PROMPTS)  # MiniLM's tokenizer has no chat template
    meta = json.loads((tmp_path / "out" / "lmtune.json").read_text())
    assert meta["saved_as"] == "full" and meta["labels"] == ["a", "b", "c"]


def test_check_parity_rejects_a_different_model(full_bert_run: Path, tmp_path: Path) -> None:
    """A reference whose weights moved slightly must fail the check, with the difference in the message."""
    folder = full_bert_run / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        model.classifier.bias.add_(1e-3)
    inputs = [export._encode(tok, t, s, model.config) for t, s in export._prompt_texts(tok, ["one", "two"])]
    logits = export._all_logits(model, inputs)

    with pytest.raises(RunError, match=r"differ by 1\.000e-03, more than the tolerance 0\.0001"):
        export._check_parity(logits, folder, AutoModelForSequenceClassification, inputs, 1e-4)
    # Within a looser tolerance the same comparison passes and reports the difference.
    assert export._check_parity(logits, folder, AutoModelForSequenceClassification, inputs, 1e-2) == \
        pytest.approx(1e-3, rel=1e-3)


def test_failed_check_leaves_nothing_at_output(
    lora_llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge that went wrong (simulated: weights perturbed before saving) exports nothing."""
    real_write = export._write_folder

    def faulty_write(model: torch.nn.Module, folder: Path, *args: object) -> None:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "q_proj" in n).add_(0.05)
        real_write(model, folder, *args)

    monkeypatch.setattr(export, "_write_folder", faulty_write)
    out = tmp_path / "exported"
    with pytest.raises(RunError, match=r"differ by .* more than the tolerance"):
        export_merged(lora_llama_run, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_must_be_an_export(full_bert_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RunError, match="exists and is not empty"):
        export_merged(full_bert_run, out)
    with pytest.raises(RunError, match="not an lmtune export"):
        export_merged(full_bert_run, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"

    shutil.rmtree(out)
    out.mkdir()  # an empty folder is fine
    export_merged(full_bert_run, out)
    first = json.loads((out / "export.json").read_text())["created"]
    with pytest.raises(RunError, match="exists and is not empty"):
        export_merged(full_bert_run, out)
    export_merged(full_bert_run, out, overwrite=True)  # an earlier export is replaced
    assert json.loads((out / "export.json").read_text())["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["run", "model", "parent"])
def test_output_never_overwrites_what_it_reads(full_bert_run: Path, where: str) -> None:
    target = {"run": full_bert_run, "model": full_bert_run / "model", "parent": full_bert_run.parent}[where]
    with pytest.raises(RunError, match="cannot be written over or inside"):
        export_merged(full_bert_run, target, overwrite=True)
    assert (full_bert_run / "model" / "lmtune.json").is_file()


def test_unknown_task_is_refused(full_bert_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(full_bert_run, run)
    meta = json.loads((run / "model" / "lmtune.json").read_text())
    (run / "model" / "lmtune.json").write_text(json.dumps({**meta, "task": "ranking"}))
    with pytest.raises(RunError, match="cannot export a model for task 'ranking'"):
        export_merged(run, tmp_path / "out")


def test_question_answering_run_exports_merged_with_equal_logits(tiny_bert_nodrop_dir: Path, tmp_path: Path) -> None:
    """A trained QA run exports merged (the auto class comes from the task, not a table that once named
    the task 'extractive_qa' and refused every QA run) and reloads in plain transformers with the same
    start/end logits."""
    import lmtune

    rows = []
    for i in range(40):
        code = ["zebra", "tiger", "otter"][i % 3]
        context = f"we met at noon and the code is {code} today ({i})"
        rows.append({"id": f"q{i}", "question": "what is the code?", "context": context,
                     "answers": {"text": [code], "answer_start": [context.index(code)]}})
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = lmtune.train({"task": "question_answering", "model": str(tiny_bert_nodrop_dir), "baselines": [],
                        "output_dir": str(tmp_path / "run"), "data": {"train": str(data), "max_length": 32},
                        "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32"}},
                       show_progress=False)
    result = export_merged(run.path, tmp_path / "out")
    assert result.source == "model" and result.max_abs_logit_diff <= 1e-5
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out").eval()
    trained = AutoModelForQuestionAnswering.from_pretrained(run.model_dir).eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "out")("what is the code?", "the code is tiger", return_tensors="pt")
    with torch.no_grad():
        after, before = reloaded(**ids), trained(**ids)
    torch.testing.assert_close(after.start_logits, before.start_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(after.end_logits, before.end_logits, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "out" / "lmtune.json").read_text())["task"] == "question_answering"
