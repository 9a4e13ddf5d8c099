"""Write a run as a GGUF file that llama.cpp (ollama, LM Studio, llama-cpp-python) runs exactly.

Our model is a Mistral decoder with a gated GELU-tanh MLP. llama.cpp's `llama`
architecture hard-codes a SiLU MLP, so written as `llama` it loads but computes the wrong
function. Its `gemma` architecture has exactly our block (RMSNorm with a plain weight,
NEOX RoPE = transformers' rotate_half, gated GELU-tanh, 1/sqrt(head_dim) attention), with
two differences that two weight folds remove:

- gemma multiplies the token embeddings by sqrt(hidden) -> write `embed / sqrt(hidden)`;
- gemma always uses the token embeddings as the output head, so the logits would come
  out 1/sqrt(hidden) too small -> write `final_norm * sqrt(hidden)`.

(llama.cpp's gemma norm is `x * w`; Hugging Face's Gemma stores `w - 1` and its converter
adds the 1 back, so our plain Mistral weights go in unchanged.) Neither architecture has
a sliding window: llama.cpp attends to every earlier token, identical to Mistral's
sliding-window model up to `sliding_window` tokens of context and different beyond.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from sentencepiece import SentencePieceProcessor

from tinystory.errors import QuantizationError
from tinystory.paths import atomic_path
from tinystory.tokenizer import is_byte_level, load_mistral, mistral_model_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ARCH = "gemma"
QTYPES = ("f32", "f16", "q8_0")

# Hugging Face name inside `model.layers.{i}.` -> llama.cpp name inside `blk.{i}.`
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensors(model: PreTrainedModel) -> dict[str, np.ndarray]:
    """llama.cpp name -> fp32 array (PyTorch (out, in) order), with gemma's two folds."""

    cfg = model.config
    if not cfg.tie_word_embeddings:
        raise QuantizationError("GGUF export needs tied input/output embeddings (llama.cpp's gemma has one matrix)",
                                "train with a preset that ties them (all shipped presets do)")
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    root = math.sqrt(cfg.hidden_size)
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"] / np.float32(root),  # gemma scales it back up
        "output_norm.weight": sd["model.norm.weight"] * np.float32(root),  # undoes the fold in the head
    }
    for i in range(cfg.num_hidden_layers):
        for hf, cpp in LAYER_NAMES.items():
            out[f"blk.{i}.{cpp}.weight"] = sd[f"model.layers.{i}.{hf}.weight"]
    return out


def _encode(name: str, array: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """The bytes llama.cpp expects for one tensor; norms (1-D) always stay f32, like convert_hf_to_gguf."""

    T = gguf.GGMLQuantizationType
    if array.ndim == 1 or qtype == "f32":
        return array.astype(np.float32), T.F32
    if qtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return gguf.quants.quantize(array.astype(np.float32), T.Q8_0), T.Q8_0
    return array.astype(np.float16), T.F16  # f16, or q8_0 rows that are not a multiple of 32


def _add_spm_vocab(w: Any, vocab_size: int) -> None:
    """The Mistral sentencepiece vocab as llama.cpp's `llama` (SPM) tokenizer model."""

    sp = SentencePieceProcessor(model_file=str(mistral_model_file()))
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                else T.BYTE if sp.IsByte(i) else T.NORMAL)
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(kind)
    for i in range(sp.vocab_size(), vocab_size):  # a config vocab padded past the tokenizer's
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(T.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(True)  # sentencepiece's dummy prefix: "Once" -> "▁Once"


def _add_bpe_vocab(w: Any, tok: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """A byte-level BPE as llama.cpp's `gpt2` model with the `gpt-2` pre-tokenizer and its merges."""

    core = json.loads(tok.backend_tokenizer.to_str())
    by_id = {i: piece for piece, i in tok.get_vocab().items()}
    specials = set(tok.all_special_ids)
    T = gguf.TokenType
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [T.CONTROL if i in specials else T.NORMAL if i in by_id else T.UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in core["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # tokenizes 228/228 val stories as `tokenizers` does ("default": 37/228)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def _add_tokenizer(w: Any, tok: PreTrainedTokenizerBase, vocab_size: int) -> None:

    if is_byte_level(tok):
        _add_bpe_vocab(w, tok, vocab_size)
    elif tok.get_vocab() == load_mistral().get_vocab():  # also a run made before the shipped file
        _add_spm_vocab(w, vocab_size)
    else:
        raise QuantizationError("GGUF export knows the mistral vocab and byte-level BPE, not this tokenizer",
                                "prepare with --set data.tokenizer=mistral or bpe:N")
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    w.add_add_bos_token(True)  # every story starts with BOS in training
    w.add_add_eos_token(False)


def _add_hparams(w: Any, cfg: Any, name: str, qtype: str) -> None:

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_name(name)
    w.add_description("tinystory-llm Mistral (GELU-tanh MLP) as llama.cpp gemma: "
                      "token_embd = embed/sqrt(hidden), output_norm = norm*sqrt(hidden)")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model: PreTrainedModel, tok: PreTrainedTokenizerBase, path: str | Path, qtype: str = "q8_0",
               name: str = "tinystory", extra: dict[str, str] | None = None) -> Path:
    """Write `model` + `tok` as a GGUF file (qtype f32, f16 or q8_0), atomically; returns the path.

    `extra` adds string metadata (e.g. `tinystory.source_run`); llama.cpp ignores unknown keys.
    """

    if qtype not in QTYPES:
        raise QuantizationError(f"unknown GGUF type {qtype!r}", f"use one of: {', '.join(QTYPES)}")
    cfg = model.config
    act = cfg.hidden_act
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise QuantizationError(f"GGUF export expects a GELU-tanh MLP, this model uses {act!r}",
                                "export models built by tinystory's model factory")
    path = Path(path)
    with atomic_path(path) as tmp:  # whole, or not at all (a full disk leaves nothing)
        w = gguf.GGUFWriter(str(tmp), arch=ARCH)
        try:
            _add_hparams(w, cfg, name, qtype)
            _add_tokenizer(w, tok, cfg.vocab_size)
            for key, value in (extra or {}).items():
                w.add_string(key, value)
            for tname, array in gguf_tensors(model).items():
                data, dtype = _encode(tname, array, qtype)
                w.add_tensor(tname, data, raw_dtype=dtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path
