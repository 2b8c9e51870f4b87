"""A transformers decoder folder as one GGUF file, for llama.cpp and Ollama: the two architectures lmtune bundles.

Written with gguf-py (the ``gguf`` package, llama.cpp's own writer): hyperparameters under llama.cpp's key
names, the tokenizer (tokens, types, merges or scores, special token ids, the chat template) and the tensors
renamed with ``gguf.get_tensor_name_map``. What each architecture needs follows llama.cpp's converter
(``conversion/llama.py`` and ``conversion/gemma.py`` of ``convert_hf_to_gguf.py``):

- Llama (SmolLM2): q_proj and k_proj rows are permuted, since llama.cpp applies rotary embeddings to
  interleaved pairs where transformers rotates the two halves of each head. The tokenizer is a byte-level BPE
  (``tokenizer.ggml.model = gpt2``) whose pre-tokenizer llama.cpp knows by name (``tokenizer.ggml.pre``),
  recognised as llama.cpp does: by the token ids of a fixed check text.
- Gemma 3: every RMSNorm weight is stored as ``1 + w`` (transformers scales by ``1 + w``, llama.cpp by the
  stored factor); the sliding-window layers and their rotary base are written out. The tokenizer is a
  sentencepiece-style BPE (``tokenizer.ggml.model = llama``) whose merge order becomes token scores.

Anything else (another architecture, rotary scaling, a tokenizer of an unknown kind) is refused with a
:class:`~lmtune.errors.RunError` rather than written wrong; the export then checks the written file in
llama.cpp itself (``lmtune.models.export_gguf``).
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmtune.errors import RunError

log = logging.getLogger("lmtune")

# transformers model_type -> gguf architecture.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma3_text": gguf.MODEL_ARCH.GEMMA3, "gemma3": gguf.MODEL_ARCH.GEMMA3}
SUPPORTED = "Llama (SmolLM2, model: smollm2) and Gemma 3 (model: gemma3)"

# llama.cpp names a byte-level BPE pre-tokenizer by the sha256 of the token ids a tokenizer gives this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the two below are the ones of the Llama-architecture models
# lmtune exports: SmolLM (SmolLM2 included) and Llama 3.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
    "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}
# Turn-end markers of the chat templates lmtune uses (ChatML, Gemma): written as the end-of-turn token, so
# llama.cpp and Ollama stop a reply there.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")
SPIECE_SPACE = "\u2581"


def gguf_architecture(config: Any) -> gguf.MODEL_ARCH:
    """The GGUF architecture of a transformers config; RunError for one this export does not convert."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise RunError(f"GGUF export converts {SUPPORTED} decoders, not model_type '{model_type}'",
                       hint="`--format merged` writes a transformers folder for any model")
    return ARCHITECTURES[model_type]


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, *, name: str, float_type: str = "f32") -> None:
    """Write ``model`` (a float32 ``LlamaForCausalLM`` or ``Gemma3ForCausalLM``) and ``tokenizer`` as a GGUF
    at ``path``; matrices as ``float_type`` (``f32`` or ``f16``), norms always float32 (as llama.cpp does)."""
    config = _text_config(model.config)
    arch = gguf_architecture(model.config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if float_type == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if arch == gguf.MODEL_ARCH.LLAMA:
            _llama_parameters(writer, config)
        else:
            _gemma3_parameters(writer, config)
        _tokenizer(writer, tokenizer, config)
        _tensors(writer, model, config, arch, float_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# ------------------------------------------------------------------------------------------ hyperparameters
def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def _rope_theta(config: Any, kind: str | None = None) -> float:
    """The rotary base (``kind``: a Gemma 3 layer type); RunError for rotary scaling, which is not converted."""
    params = getattr(config, "rope_parameters", None) or {}
    if kind is not None and isinstance(params.get(kind), dict):
        params = params[kind]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise RunError(f"GGUF export writes plain rotary embeddings, not rope_type '{rope_type}'",
                       hint="`--format merged` writes a transformers folder for any model")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise RunError("the model's config has no rope_theta to write into the GGUF")
    return float(theta)


def _common_parameters(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def _llama_parameters(writer: gguf.GGUFWriter, config: Any) -> None:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise RunError("GGUF export converts Llama models without attention or MLP biases")
    if config.hidden_act != "silu":
        raise RunError(f"llama.cpp's Llama uses SiLU, this model '{config.hidden_act}'")
    _common_parameters(writer, config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))


def _gemma3_parameters(writer: gguf.GGUFWriter, config: Any) -> None:
    head_dim = int(config.head_dim)
    # llama.cpp scales attention by 1/sqrt(head_dim) for every Gemma 3 but the 27B: a model whose
    # query_pre_attn_scalar says otherwise would compute different attention there.
    if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        raise RunError(f"llama.cpp scales Gemma 3 attention by head_dim ({head_dim}); this model's "
                       f"query_pre_attn_scalar is {config.query_pre_attn_scalar}")
    if getattr(config, "attn_logit_softcapping", None):
        raise RunError("llama.cpp's Gemma 3 has no attention logit soft-capping")
    _common_parameters(writer, config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config, "full_attention"))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    layer_types = list(getattr(config, "layer_types", None) or [])
    if "sliding_attention" in layer_types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        writer.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))


# ------------------------------------------------------------------------------------------ tensors
def _permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf LlamaModel.permute): per head, the two
    halves interleaved."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensors(writer: gguf.GGUFWriter, model: torch.nn.Module, config: Any, arch: gguf.MODEL_ARCH,
             float_type: str) -> None:
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False)) or (
        "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]))
    n_head = int(config.num_attention_heads)
    n_kv = int(config.num_key_value_heads or n_head)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:  # llama.cpp reuses token_embd for the output
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RunError(f"GGUF export has no llama.cpp name for the tensor '{hf_name}'")
        data = tensor.detach().to(torch.float32)
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, n_head)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, n_kv)
        elif arch == gguf.MODEL_ARCH.GEMMA3 and hf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma3RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
        array = data.numpy()
        if float_type == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))


# ------------------------------------------------------------------------------------------ tokenizer
def _tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: Any) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RunError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise RunError(f"GGUF export converts BPE tokenizers, not '{model.get('type')}'")
    vocab_size = int(config.vocab_size)
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    beyond = sorted(i for i in by_id if i >= vocab_size)
    if any(i not in added for i in beyond):
        raise RunError(f"the tokenizer has token ids up to {max(beyond)}, beyond the model's vocabulary of "
                       f"{vocab_size}")
    if beyond:  # added tokens the model has no embedding for (it can never read or write them): left out
        log.warning("GGUF export leaves out the tokenizer's added tokens %s: their ids are beyond the model's "
                    "vocabulary of %d", [by_id[i] for i in beyond], vocab_size)
        for i in beyond:
            del by_id[i], added[i]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if _is_byte_level(spec):
        _byte_level_vocab(writer, tokenizer, by_id, added, merges, vocab_size)
    else:
        _sentencepiece_vocab(writer, spec, by_id, added, merges, vocab_size)
    # Special tokens: what the run's tokenizer says, so llama.cpp starts, ends and pads as transformers does.
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(token_id))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
        eot = next((t for t in END_OF_TURN_TOKENS if t in template and t in tokenizer.get_vocab()), None)
        if eot is not None:
            writer.add_eot_token_id(int(tokenizer.convert_tokens_to_ids(eot)))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and len(probe) > len(bare)
                             and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and len(probe) > len(bare)
                             and probe[-1] == tokenizer.eos_token_id)


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def kinds(node: Any) -> list[str]:
        if not isinstance(node, dict):
            return []
        return [str(node.get("type")), *[k for child in node.get("pretokenizers", []) for k in kinds(child)]]
    return "ByteLevel" in kinds(spec.get("pre_tokenizer")) or "ByteLevel" in kinds(spec.get("decoder"))


def _token_types(by_id: dict[int, str], added: dict[int, dict[str, Any]], vocab_size: int) -> list[int]:
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    return types


def _byte_level_vocab(writer: gguf.GGUFWriter, tokenizer: Any, by_id: dict[int, str],
                      added: dict[int, dict[str, Any]], merges: list[str], vocab_size: int) -> None:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT, add_special_tokens=False)).encode()).hexdigest()
    # llama.cpp's hash includes a BOS a tokenizer adds itself; try both before giving up.
    digests = {digest, sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()}
    pre = next((KNOWN_PRE_TOKENIZERS[d] for d in digests if d in KNOWN_PRE_TOKENIZERS), None)
    if pre is None:
        raise RunError("the model's byte-level BPE tokenizer splits text in a way this GGUF export does not "
                       f"know (llama.cpp names it by a hash; this one is {digest[:12]}...)",
                       hint=f"GGUF export handles the tokenizers of {SUPPORTED}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types(_token_types(by_id, added, vocab_size))
    writer.add_token_merges(merges)
    writer.add_add_space_prefix(False)


def _sentencepiece_vocab(writer: gguf.GGUFWriter, spec: dict[str, Any], by_id: dict[int, str],
                         added: dict[int, dict[str, Any]], merges: list[str], vocab_size: int) -> None:
    """llama.cpp's sentencepiece tokenizer merges the adjacent pair whose joined token scores highest: the
    scores are the BPE's merge order (the first merge scores highest)."""
    if not spec["model"].get("byte_fallback"):
        raise RunError("GGUF export converts sentencepiece-style tokenizers with byte fallback (Gemma's) and "
                       "byte-level BPE ones (SmolLM2's); this one has neither")
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    tokens, scores = [], []
    types = _token_types(by_id, added, vocab_size)
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        if i in added and not added[i].get("special"):
            # llama.cpp matches user-defined tokens against the raw text, so they are spelled with spaces
            token = token.replace(SPIECE_SPACE, " ")
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">") and i not in added:
            types[i] = int(gguf.TokenType.BYTE)
        tokens.append(token)
        if types[i] == gguf.TokenType.NORMAL:
            scores.append(-float(rank.get(token, len(merges) + i)))
        else:
            scores.append(-1000.0 if types[i] != gguf.TokenType.BYTE else 0.0)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a ▁ before the text (sentencepiece's add_dummy_prefix)."""
    pre = spec.get("pre_tokenizer") or {}
    nodes = [pre, *pre.get("pretokenizers", [])] if isinstance(pre, dict) else []
    if any(n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") != "never" for n in nodes):
        return True
    norm = spec.get("normalizer") or {}
    norms = [norm, *norm.get("normalizers", [])] if isinstance(norm, dict) else []
    return any(n.get("type") == "Prepend" for n in norms)
