"""The Hugging Face files that make the demo's generated checkpoint a model vLLM serves:
``config.json``, ``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json``.
Plain JSON written here (the main venv has no ``tokenizers``); the weights come from
``examples/tiny_llm_server.py``'s ``make_checkpoint`` (Hugging Face Llama tensor names).

The tokenizer is a byte-level BPE (GPT-2's byte alphabet) with exactly the model's vocabulary
size, so every id the model can sample decodes: three special tokens, the 256 byte symbols,
then merges that grow letters into words (``Ġa``, ``ab``, ``abc``...) until the size is
reached. Not a trained tokenizer: a valid one, deterministic, made in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEAD_DIM = 64  # as the example server's make_checkpoint shapes its attention
SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as Llama's
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's map of the 256 bytes to printable characters, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bpe_vocab(size: int) -> tuple[dict[str, int], list[list[str]]]:
    """A byte-level BPE vocabulary of exactly ``size`` tokens and its merges (in rank order)."""
    alphabet = byte_alphabet()
    first = len(SPECIAL) + len(alphabet)
    if size < first + 1:
        raise ValueError(f"a vocabulary of {size} tokens: at least {first + 1} needed")
    vocab = {t: i for i, t in enumerate([*SPECIAL, *alphabet])}
    merges: list[list[str]] = []
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    space = alphabet[ord(" ")]  # "Ġ"
    grow = [space, *letters]  # breadth first: every token so far, extended by one letter
    i = 0
    while len(vocab) < size:
        left = grow[i]
        i += 1
        for c in letters:
            if len(vocab) >= size:
                break
            merged = left + c
            if merged in vocab:
                continue
            vocab[merged] = len(vocab)
            merges.append([left, c])
            grow.append(merged)
    return vocab, merges


def tokenizer_json(size: int) -> dict[str, Any]:
    vocab, merges = bpe_vocab(size)
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bos = {"SpecialToken": {"id": SPECIAL[1], "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {SPECIAL[1]: {"id": SPECIAL[1], "ids": [1], "tokens": [SPECIAL[1]]}},
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def hf_config(
    hidden: int, intermediate: int, layers: int, vocab: int, max_positions: int
) -> dict[str, Any]:
    """A Llama ``config.json`` for the example server's tensors (no biases, untied head)."""
    heads = hidden // HEAD_DIM
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": HEAD_DIM,
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def write_hf_files(
    out: Path, hidden: int, intermediate: int, layers: int, vocab: int, max_positions: int = 2048
) -> list[Path]:
    """Write the four files into ``out`` (``config.json`` replaced); returns their paths."""
    files = {
        "config.json": hf_config(hidden, intermediate, layers, vocab, max_positions),
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False},
        "tokenizer.json": tokenizer_json(vocab),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL[1],
            "eos_token": SPECIAL[2],
            "unk_token": SPECIAL[0],
            "model_max_length": max_positions,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in files.items():
        (out / name).write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out / name)
    return written
