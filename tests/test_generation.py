"""Batched generation on a tiny random Llama with SmolLM2's real tokenizer (ChatML, eos == pad == <|im_end|>)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.config import GenerationConfig
from lmtune.errors import ModelError
from lmtune.models.generation import GenerationSettings, chat_prompt, generate, stream_chat

QUESTIONS = [
    "hi",
    "What is the capital of France?",
    "Tell me a long story about dragons and knights, please, with many details.",
    "2+2=",
    "北京是中国的首都吗？",
    "hello there my friend",
    "a",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


@pytest.fixture(scope="module")
def model(tiny_chat_llama_dir: Path):
    """The tiny Llama with weights drawn at std 0.3: at the default 0.02 its greedy answer to every prompt
    is a run of newlines, which would make batched == unbatched hold trivially."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return lm.eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    return [chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def greedy(model, tokenizer, prompts) -> list[dict]:
    """Each prompt generated alone (batch size 1): the reference for the batched runs."""
    settings = GenerationSettings(max_new_tokens=16)
    return [generate(model, tokenizer, [p], settings)[0] for p in prompts]


def _eos_after(model, trigger_id: int, eos_id: int):
    """A forward hook making EOS the certain next token whenever the last input token is ``trigger_id``."""

    def hook(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]  # (B,): with the KV cache, the newest token
        output.logits[last == trigger_id, -1, eos_id] += 1e4  # logits (B, T', vocab)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_settings_from_config() -> None:
    cfg = GenerationConfig(
        max_new_tokens=7,
        do_sample=True,
        temperature=0.5,
        top_p=0.8,
        stop=["\n"],
        batch_size=3,
        seed=5,
        repetition_penalty=1.1,
    )
    assert GenerationSettings.from_config(cfg) == GenerationSettings(
        max_new_tokens=7,
        do_sample=True,
        temperature=0.5,
        top_p=0.8,
        repetition_penalty=1.1,
        stop=["\n"],
        batch_size=3,
        seed=5,
    )
    assert GenerationSettings.from_config(GenerationConfig()) == GenerationSettings()
    with pytest.raises(ValueError, match="batch_size"):
        GenerationSettings(batch_size=0)


def test_greedy_answers_are_not_degenerate(greedy, prompts, tokenizer) -> None:
    # The invariance tests below only mean something if answers differ between prompts of different lengths.
    assert len({r["text"] for r in greedy}) == len(prompts)
    assert len({r["prompt_tokens"] for r in greedy}) >= 5
    for r, p in zip(greedy, prompts, strict=True):
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 16
        assert r["prompt_tokens"] == len(tokenizer(p, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_batched_greedy_equals_one_at_a_time(model, tokenizer, prompts, greedy, batch_size) -> None:
    # Left padding + attention mask + mask-derived position ids: a prompt's answer must not depend on its
    # batch-mates; results come back in input order although batches are sorted by length.
    out = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16, batch_size=batch_size))
    assert out == greedy


def test_batched_greedy_equals_one_at_a_time_with_absolute_positions(tokenizer, prompts) -> None:
    # Llama's RoPE is relative, so it forgives position ids shifted by the padding; GPT-2's learned absolute
    # positions do not: this checks that generate derives them from the attention mask.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            initializer_range=0.3,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    settings = GenerationSettings(max_new_tokens=10, batch_size=4)
    batched = generate(gpt2, tokenizer, prompts, settings)
    assert batched == [generate(gpt2, tokenizer, [p], settings)[0] for p in prompts]
    assert len({r["text"] for r in batched}) >= 5


def test_greedy_is_deterministic_and_restores_train_mode(model, tokenizer, prompts) -> None:
    lm = copy.deepcopy(model).train()
    settings = GenerationSettings(max_new_tokens=8, batch_size=4)
    assert generate(lm, tokenizer, prompts, settings) == generate(lm, tokenizer, prompts, settings)
    assert lm.training
    assert generate(lm, tokenizer, [], settings) == []


def test_stops_at_eos(model, tokenizer, prompts, greedy) -> None:
    # Make EOS certain right after the 4th token of prompt 0's greedy answer: prompt 0 must end there
    # ("stop", 4 tokens + EOS) while every prompt whose answer never produces that token runs to the limit.
    settings = GenerationSettings(max_new_tokens=16)
    plain = model.generate(
        **tokenizer([prompts[0]], return_tensors="pt", add_special_tokens=False),
        max_new_tokens=16,
        do_sample=False,
    )
    first_tokens = plain[0, -16:].tolist()
    trigger = first_tokens[3]
    cut = first_tokens.index(trigger) + 1  # first occurrence ends the answer
    others = [i for i, r in enumerate(greedy) if i and tokenizer.decode([trigger]) not in r["text"]]
    assert len(others) >= 3
    lm = copy.deepcopy(model)
    handle = _eos_after(lm, trigger, tokenizer.eos_token_id)
    try:
        out = generate(lm, tokenizer, prompts, GenerationSettings(max_new_tokens=16, batch_size=4))
        alone = generate(lm, tokenizer, [prompts[0]], settings)[0]
    finally:
        handle.remove()
    assert out[0] == alone
    assert out[0]["finish_reason"] == "stop"
    assert out[0]["completion_tokens"] == cut + 1  # the EOS counts
    assert out[0]["text"] == tokenizer.decode(first_tokens[:cut], skip_special_tokens=True)
    assert out[0]["text"] == greedy[0]["text"][: len(out[0]["text"])]
    for i in others:
        assert out[i] == greedy[i]


def test_eos_token_ids_argument_overrides_the_model(model, tokenizer, prompts, greedy) -> None:
    # Declaring the first generated token an EOS ends every answer at once, with no text.
    first = model.generate(
        **tokenizer([prompts[1]], return_tensors="pt", add_special_tokens=False),
        max_new_tokens=1,
        do_sample=False,
    )[0, -1].item()
    out = generate(
        model, tokenizer, [prompts[1]], GenerationSettings(max_new_tokens=16), eos_token_ids=[first]
    )
    assert out == [
        {
            "text": "",
            "finish_reason": "stop",
            "prompt_tokens": greedy[1]["prompt_tokens"],
            "completion_tokens": 1,
        }
    ]


def test_stop_string_cuts_text_and_stops_early(model, tokenizer, prompts, greedy) -> None:
    full = greedy[2]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and full.count(stop) >= 1
    expected = full[: full.find(stop)]
    settings = GenerationSettings(max_new_tokens=16, stop=[stop])
    out = generate(model, tokenizer, [prompts[2]], settings)[0]
    assert out["text"] == expected
    assert out["finish_reason"] == "stop"
    used = out["completion_tokens"]
    assert used < 16  # generation stopped early, not only the text cut
    # It stopped at the first token whose text completes the stop string: one token fewer does not hold it.
    shorter = generate(
        model, tokenizer, [prompts[2]], GenerationSettings(max_new_tokens=used - 1, stop=[stop])
    )[0]
    assert shorter["finish_reason"] == "length" and stop not in shorter["text"]
    # In a batch, the row that stops does not disturb the others, and a stop string that never occurs
    # changes nothing.
    batched = generate(
        model, tokenizer, prompts, GenerationSettings(max_new_tokens=16, stop=[stop, "§never§"], batch_size=4)
    )
    for i, (b, g) in enumerate(zip(batched, greedy, strict=True)):
        if stop in g["text"]:
            assert b["text"] == g["text"][: g["text"].find(stop)] and b["finish_reason"] == "stop"
        else:
            assert b == g, i


def test_earliest_of_several_stop_strings_wins(model, tokenizer, prompts, greedy) -> None:
    full = greedy[3]["text"]
    early, late = full[3:5], full[9:12]
    assert full.find(early) < full.find(late)
    out = generate(model, tokenizer, [prompts[3]], GenerationSettings(max_new_tokens=16, stop=[late, early]))[
        0
    ]
    assert out["text"] == full[: full.find(early)]
    assert out["finish_reason"] == "stop"


def test_sampling_is_seeded_and_leaves_caller_rng_alone(model, tokenizer, prompts, greedy) -> None:
    def sample(seed: int) -> list[dict]:
        settings = GenerationSettings(
            max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.95, seed=seed, batch_size=4
        )
        return generate(model, tokenizer, prompts, settings)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample(0) == first
    other = sample(1)
    assert [r["text"] for r in other] != [r["text"] for r in first]
    short_greedy = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12, batch_size=4))
    assert [r["text"] for r in first] != [r["text"] for r in short_greedy]


def test_peft_wrapped_model(model, tokenizer, prompts, greedy) -> None:
    from peft import LoraConfig, get_peft_model

    # A fresh LoRA adapter (B = 0) leaves the outputs unchanged; generate must work through the wrapper.
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert generate(wrapped, tokenizer, prompts[:3], GenerationSettings(max_new_tokens=16)) == greedy[:3]


def test_bos_is_not_doubled(model, tiny_chat_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    tok.add_bos_token = True  # a tokenizer that adds BOS by default (<|im_start|> for SmolLM2)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    settings = GenerationSettings(max_new_tokens=2)
    with_bos, without = generate(model, tok, [tok.bos_token + "hi", "hi"], settings)
    assert with_bos["prompt_tokens"] == without["prompt_tokens"] == 2  # [BOS, hi] both times
    assert with_bos == without


def test_progress_advances_per_prompt(model, tokenizer, prompts) -> None:
    from rich.progress import Progress

    with Progress(disable=True) as progress:
        generate(
            model, tokenizer, prompts, GenerationSettings(max_new_tokens=2, batch_size=3), progress=progress
        )
    (task,) = progress.tasks
    assert task.description == "generate" and task.total == len(prompts) and task.completed == len(prompts)


def test_chat_prompt(tokenizer, tiny_chat_llama_dir: Path) -> None:
    prompt = chat_prompt(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    bare = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    bare.chat_template = None
    with pytest.raises(ModelError, match="no chat template") as err:
        chat_prompt(bare, [{"role": "user", "content": "hi"}])
    assert err.value.hint


@pytest.mark.parametrize("index", [2, 4])
def test_stream_chat_joins_to_generate(model, tokenizer, greedy, index) -> None:
    messages = [{"role": "user", "content": QUESTIONS[index]}]
    pieces = list(stream_chat(model, tokenizer, messages, GenerationSettings(max_new_tokens=16)))
    assert len(pieces) > 1
    assert "".join(pieces) == greedy[index]["text"]


def test_stream_chat_honours_stop_strings_and_eos(model, tokenizer, prompts, greedy) -> None:
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    full = greedy[2]["text"]
    for stop in (full[len(full) // 2 : len(full) // 2 + 3], full[-4:], "§never§"):
        settings = GenerationSettings(max_new_tokens=16, stop=[stop])
        expected = generate(model, tokenizer, [prompts[2]], settings)[0]["text"]
        assert "".join(stream_chat(model, tokenizer, messages, settings)) == expected
    first = model.generate(
        **tokenizer([prompts[2]], return_tensors="pt", add_special_tokens=False),
        max_new_tokens=1,
        do_sample=False,
    )[0, -1].item()
    assert "".join(stream_chat(model, tokenizer, messages, GenerationSettings(), eos_token_ids=[first])) == ""


def test_stream_chat_closed_early_stops_the_thread(model, tokenizer) -> None:
    import threading

    stream = stream_chat(
        model, tokenizer, [{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=500)
    )
    assert next(stream)
    stream.close()  # cancels generation and joins the thread
    assert not any(t.name == "lmtune-stream-chat" for t in threading.enumerate())
