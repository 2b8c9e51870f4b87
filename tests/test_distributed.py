"""Several processes for real: two CPU processes on the gloo backend, started by `lmtune train
--num-processes 2` (`accelerate launch` underneath), against one process with the same global batch.

Two processes with batch 4 each take, per optimizer step, the two length-grouped batches that one
process with batch 4 x accumulation 2 takes one after the other, so the loss curves and weights must
agree up to float summation order (gloo's all-reduce adds the two halves in another order).
Dropout is off: each process draws its own masks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

# Loss per logged step: summation order only (measured differences ~1e-7 on this tiny model).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _fsdp_unsupported() -> str | None:
    """Why FSDP cannot run on two processes here (None if it can)."""
    import accelerate

    if torch.cuda.device_count() < 2:
        # torch itself shards on CPU (fully_shard over gloo), but Accelerate turns FSDP on only for
        # accelerator devices (MULTI_GPU, NPU, XPU, ...): its MULTI_CPU mode has no FSDP. lmtune
        # refuses the combination rather than silently training data parallel (tested below).
        return (f"FSDP needs 2 GPUs here: accelerate {accelerate.__version__} enables FSDP only for accelerator "
                f"devices, not for CPU processes (this machine has {torch.cuda.device_count()} GPUs)")
    return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers import sentiment_rows, tiny_bert, write_csv

    root = tmp_path_factory.mktemp("dist")
    # 256 training rows: 64 batches of 4, an even number, so no process repeats a batch to even out.
    # 21 validation rows: batches of 4 leave a short last one, and two processes get 3 batches each.
    return {
        "root": root,
        "model": tiny_bert(root / "bert", dropout=0.0),
        "train": write_csv(root / "train.csv", sentiment_rows(256)),
        "validation": write_csv(root / "val.csv", sentiment_rows(21, seed=5)),
        "test": write_csv(root / "test.csv", sentiment_rows(17, seed=6)),
    }


def _config(s: dict[str, Path], name: str, **train: Any) -> Path:
    cfg = {
        "task": "classification", "model": str(s["model"]),
        "data": {"train": str(s["train"]), "validation": str(s["validation"]), "test": str(s["test"]),
                 "max_length": 32},
        "train": {"epochs": 2, "batch_size": 4, "learning_rate": 2e-3, "log_every": 4, "precision": "fp32",
                  "eval_every": 16, **train},
        "baselines": [], "output_dir": str(s["root"] / name),
    }
    path = s["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lmtune(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMTUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmtune", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _rows(run: Path, split: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _one_and_two_processes(tmp_path: Path, cfg: dict[str, Any]) -> tuple[Path, Path]:
    """Train ``cfg`` on one process with accumulation 2 and on two processes; returns both run folders."""
    runs = []
    for name, train, launch in (("one", {"gradient_accumulation": 2}, []), ("two", {}, ["--num-processes", "2"])):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], **train},
                                        "output_dir": str(tmp_path / name)}))
        _lmtune(["train", str(path), *launch, "--no-progress"], tmp_path / "cache")
        runs.append(tmp_path / name)
    return runs[0], runs[1]


@pytest.fixture(scope="module")
def one_process(setup: dict[str, Path]) -> Path:
    _lmtune(["train", str(_config(setup, "one", gradient_accumulation=2)), "--no-progress"], setup["root"] / "cache")
    return setup["root"] / "one"


def _compare_with_one_process(one: Path, two: Path, *, rtol: float, atol: float) -> float:
    a, b = _rows(one, "train"), _rows(two, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 16  # 64 steps, a row every 4
    worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b, strict=True))
    assert worst <= rtol, f"loss curves differ by {worst:.2e} (relative)"
    assert b[-1]["loss"] < 0.8 * b[0]["loss"]  # and it learned
    wa, wb = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= atol, f"final weights differ by {diff:.2e}"
    print(f"{two.name} vs one process: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f}, worst relative loss "
          f"difference {worst:.2e}, largest weight difference {diff:.2e}")
    return worst


def test_two_processes_match_one_process(setup: dict[str, Path], one_process: Path) -> None:
    out = _lmtune(["train", str(_config(setup, "two")), "--num-processes", "2", "--no-progress"],
                  setup["root"] / "cache")
    two = setup["root"] / "two"
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    worst = _compare_with_one_process(one_process, two, rtol=LOSS_RTOL, atol=WEIGHT_ATOL)
    print(f"two processes vs one: worst relative loss difference {worst:.2e}")
    # Evaluation gathered across processes, each example once: the short last batches are not doubled.
    one_metrics = json.loads((one_process / "metrics.json").read_text())
    for split, n in (("validation", 21), ("test", 17)):
        assert metrics[split]["num_examples"] == n
        assert metrics[split]["confusion_matrix"] == one_metrics[split]["confusion_matrix"]
        assert metrics[split]["loss"] == pytest.approx(one_metrics[split]["loss"], rel=1e-4)
    for a, b in zip(_rows(one_process, "validation"), _rows(two, "validation"), strict=True):
        assert a["num_examples"] == b["num_examples"] == 21
    # Only the main process wrote the run folder: the same files, one log, no repeated rows.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one_process.iterdir())
    assert len(_rows(two, "train")) == 16
    log = (two / "train.log").read_text()
    assert log.count("training: 64 steps") == 1 and "x 2 process(es)" in log
    # the results table printed by the launching command
    assert "accuracy" in out.stdout


@pytest.mark.slow
def test_two_process_run_killed_then_resumed_matches(setup: dict[str, Path], one_process: Path) -> None:
    """SIGKILL to the whole process group after a checkpoint, then --resume on two processes: the same
    weights as one process with the same global batch (and so as an uninterrupted two-process run)."""
    import signal
    import time

    cfg = _config(setup, "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMTUNE_CACHE": str(setup["root"] / "cache")}
    cmd = [sys.executable, "-m", "lmtune", "train", str(cfg), "--num-processes", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = setup["root"] / "killed" / "checkpoints" / "step-00000032"
    deadline = time.time() + 300
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # The launcher, accelerate/torchrun and both workers: torchrun's workers live in their own process
    # group, so killing the launcher's group alone would leave them to finish the run.
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(family, timeout=30)
    assert target.is_dir(), "the run ended before its step-32 checkpoint"
    assert len(family) >= 4, f"expected launcher, torchrun and 2 workers, killed {len(family)} processes"
    run = setup["root"] / "killed"
    time.sleep(1)
    assert not (run / "checkpoints" / "step-00000064").exists(), "the workers survived the kill"
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # killed, not finished
    _lmtune(["train", str(cfg), "--num-processes", "2", "--no-progress", "--resume"], setup["root"] / "cache")
    assert "resumed from" in (run / "train.log").read_text()
    _compare_with_one_process(one_process, run, rtol=LOSS_RTOL, atol=WEIGHT_ATOL)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_fsdp_two_processes_match_one_process(setup: dict[str, Path], one_process: Path) -> None:
    reason = _fsdp_unsupported()
    if reason:
        pytest.skip(reason)
    _lmtune(["train", str(_config(setup, "fsdp", **{"distributed": {"strategy": "fsdp"}})),
             "--num-processes", "2", "--no-progress"], setup["root"] / "cache")
    fsdp = setup["root"] / "fsdp"
    worst = _compare_with_one_process(one_process, fsdp, rtol=LOSS_RTOL, atol=WEIGHT_ATOL)
    print(f"FSDP (2 processes) vs one process: worst relative loss difference {worst:.2e}")
    log = (fsdp / "train.log").read_text()
    assert "gathered the sharded model" in log and "saved model reloads with plain transformers" in log



# ------------------------------------------------------------------ config -> Accelerate, without launching
def _cfg(**distributed: Any) -> Any:
    from lmtune.config import load_config

    return load_config({"data": {"train": "x.csv"}, "train": {"distributed": distributed}})


def test_fsdp_knobs_reach_accelerates_plugin() -> None:
    from lmtune.training.distributed import accelerator_plugins

    plugin = accelerator_plugins(_cfg(strategy="fsdp", sharding_strategy="SHARD_GRAD_OP", auto_wrap_policy="size",
                                      min_num_params=1000, cpu_offload=True), 2)["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False  # SHARD_GRAD_OP == ZeRO-2
    assert plugin.min_num_params == 1000 and type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    v1 = accelerator_plugins(_cfg(strategy="fsdp", fsdp_version=1, sharding_strategy="HYBRID_SHARD",
                                  transformer_layer_classes=["BertLayer"]), 2)["fsdp_plugin"]
    assert v1.fsdp_version == 1 and v1.sharding_strategy.name == "HYBRID_SHARD"
    assert v1.transformer_cls_names_to_wrap == ["BertLayer"]
    # one process: plain Accelerate; ddp passes its own knobs
    assert accelerator_plugins(_cfg(strategy="fsdp"), 1) == {}
    ddp = accelerator_plugins(_cfg(find_unused_parameters=True, bucket_cap_mb=50), 2)["kwargs_handlers"][0]
    assert ddp.find_unused_parameters and ddp.bucket_cap_mb == 50


@pytest.mark.parametrize(("distributed", "message"), [
    ({"offload_params": "cpu"}, "offload_params needs train.distributed.zero_stage 3"),
    ({"strategy": "fsdp", "sharding_strategy": "HYBRID_SHARD"}, "HYBRID_SHARD is FSDP1 only"),
    ({"strategy": "mpi"}, "train.distributed.strategy"),
    ({"zero_stage": 4}, "train.distributed.zero_stage"),
])
def test_impossible_distributed_settings_fail_at_load(distributed: dict[str, Any], message: str) -> None:
    from lmtune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _cfg(**distributed)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharding_on_cpu_processes_is_refused_not_silently_ddp(strategy: str) -> None:
    from lmtune.errors import ConfigError
    from lmtune.training.distributed import accelerator_plugins, check_distributed_supported

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=f"strategy {strategy} on 2 CPU processes.*GPUs"):
        check_distributed_supported(_cfg(strategy=strategy), 2)
    # one process: the same config trains plainly (a cluster config still runs on a laptop)
    check_distributed_supported(_cfg(strategy=strategy), 1)
    assert accelerator_plugins(_cfg(strategy=strategy), 1) == {}


def test_fsdp_on_two_cpu_processes_fails_with_one_clear_message(setup: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = _config(setup, "fsdp-cpu", max_steps=2, **{"distributed": {"strategy": "fsdp"}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMTUNE_CACHE": str(setup["root"] / "cache")}
    proc = subprocess.run([sys.executable, "-m", "lmtune", "train", str(cfg), "--num-processes", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Accelerate runs FSDP and DeepSpeed on GPUs" in proc.stdout + proc.stderr
    assert not (setup["root"] / "fsdp-cpu" / "checkpoints").exists()


def test_launch_command_is_accelerate_launch() -> None:
    from lmtune.training.distributed import launch_command

    cmd = launch_command(["cfg.yaml", "--train.epochs", "1"], 4, num_machines=2, machine_rank=1,
                         main_process_ip="10.0.0.1", main_process_port=29500)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    joined = " ".join(cmd)
    assert "--num_processes 4 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1" in joined
    assert "--main_process_port 29500" in joined
    assert cmd[-6:] == ["-m", "lmtune", "train", "cfg.yaml", "--train.epochs", "1"]


@pytest.mark.slow
def test_two_process_lora_sft_matches_one_process(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """A decoder with LoRA: the same loss curve, and generation split over processes and gathered back
    in input order gives the same answers (an odd number of prompts: one process gets one more)."""
    from test_sft import qa_rows, write_jsonl

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(240))

    one, two = _one_and_two_processes(tmp_path, {
        "task": "sft", "model": str(tiny_chat_llama_dir), "method": {"name": "lora", "r": 8, "dropout": 0.0},
        "data": {"train": str(data), "max_length": 96},
        # 12 steps x 2 batches of 4 stay inside the first epoch: no batch is repeated to even out
        "train": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "precision": "fp32", "log_every": 2, "eval_every": 6},
        "generation": {"max_new_tokens": 6, "eval_examples": 7}})
    a, b = _rows(one, "train"), _rows(two, "train")
    assert len(a) == len(b) == 6
    worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b, strict=True))
    assert worst <= LOSS_RTOL, f"loss curves differ by {worst:.2e}"
    assert b[-1]["loss"] < b[0]["loss"]
    print(f"LoRA SFT, two processes vs one: worst relative loss difference {worst:.2e}")
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert m2["summary"]["num_processes"] == 2
    for split in ("validation", "test"):
        assert m2[split]["target_tokens"] == m1[split]["target_tokens"]  # every row counted once
        assert m2[split]["loss"] == pytest.approx(m1[split]["loss"], rel=1e-4)
        assert [e["generated"] for e in m2[split]["examples"]] == [e["generated"] for e in m1[split]["examples"]]
        assert m2[split]["generated_examples"] == m1[split]["generated_examples"] == 7
        assert m2[split]["mean_generated_words"] == m1[split]["mean_generated_words"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["token_classification", "question_answering"])
def test_two_process_evaluation_of_span_tasks_matches_one_process(task: str, tmp_path: Path,
                                                                  tiny_bert_nodrop_dir: Path) -> None:
    """NER and QA pad and gather their own per-token / per-window tensors: across two processes the
    metrics must come out as from one (an uneven number of evaluation batches included)."""
    if task == "token_classification":
        from test_token_classification import synthetic_conll

        data_file = tmp_path / "train.conll"
        data_file.write_text(synthetic_conll(300), encoding="utf-8")
        data = {"train": str(data_file), "max_length": 32}
        keys = ("f1", "precision", "recall", "tag_accuracy", "loss")
    else:
        from test_question_answering import _synthetic_qa

        data_file = tmp_path / "qa.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in _synthetic_qa(300)), encoding="utf-8")
        data = {"train": str(data_file), "max_length": 24, "doc_stride": 6, "max_answer_length": 5}
        keys = ("exact_match", "f1", "loss", "num_examples")

    _one_and_two_processes(tmp_path, {
        "task": task, "model": str(tiny_bert_nodrop_dir), "data": data,
        "train": {"max_steps": 10, "batch_size": 4, "learning_rate": 3e-3, "precision": "fp32",
                  "log_every": 2, "eval_every": 5, "eval_batch_size": 3}})
    m1, m2 = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert m2["summary"]["num_processes"] == 2
    for split in ("validation", "test"):
        for key in keys:
            if key in m1[split]:
                assert m2[split][key] == pytest.approx(m1[split][key], rel=1e-4, abs=1e-6), (split, key)
        print(task, split, {k: (m1[split][k], m2[split][k]) for k in keys if k in m1[split]})


@pytest.mark.slow
def test_two_processes_stream_disjoint_shards(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """data.streaming on two processes: each reads its own shards, the run completes and learns."""
    from test_streaming import _jsonl_shards, _paragraphs, _stream_cfg

    _jsonl_shards(tmp_path / "shards", [{"text": p} for p in _paragraphs(80)], 4)
    cfg = _stream_cfg(tmp_path, tiny_chat_llama_dir, train={"max_steps": 16, "eval_every": 8, "log_every": 2})
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _lmtune(["train", str(path), "--num-processes", "2", "--no-progress"], tmp_path / "cache")
    run = tmp_path / "run"
    data = json.loads((run / "data.json").read_text())
    assert data["train"]["processes"] == 2 and data["train"]["split_between_processes"] == "by shard"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    assert metrics["test"]["perplexity"] < metrics["starting_point"]["test"]["perplexity"] / 5
    train = _rows(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.slow
def test_two_process_dpo_matches_one_process(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """DPO on two processes: the reference log-probs are computed once, shared out across the processes and
    gathered back (each pair's own), and the loss curve and held-out preference metrics equal one process
    with accumulation 2."""
    from test_preference_tasks import pair_rows, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(200))
    one, two = _one_and_two_processes(tmp_path, {
        "task": "dpo", "model": str(tiny_chat_llama_dir),
        "data": {"train": str(data), "max_length": 64},
        # 12 steps x 2 batches of 4 stay inside the first epoch (160 training pairs): no batch is repeated
        "train": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "precision": "fp32", "log_every": 2, "eval_every": 6},
        "generation": {"max_new_tokens": 4, "eval_examples": 5}})
    a, b = _rows(one, "train"), _rows(two, "train")
    assert len(a) == len(b) == 6
    worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b, strict=True))
    assert worst <= LOSS_RTOL, f"loss curves differ by {worst:.2e}"
    ra, rb = (load_file(str(p / "reference_logps.safetensors")) for p in (one, two))
    assert ra.keys() == rb.keys()
    assert all(torch.allclose(ra[k], rb[k], atol=1e-5) for k in ra)
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert m2["summary"]["num_processes"] == 2
    for split in ("validation", "test"):
        assert m2[split]["pairs"] == m1[split]["pairs"] == 20  # every pair counted once
        for key in ("loss", "accuracy", "reward_margin", "logp_accuracy"):
            assert m2[split][key] == pytest.approx(m1[split][key], rel=1e-4, abs=1e-6), key
    print(f"DPO, two processes vs one: worst relative loss difference {worst:.2e}")
