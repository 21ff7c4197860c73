"""Make a tiny Llama and its tokenizer (run by the engines venv's python: transformers and
tokenizers live there). Random weights, bf16, one safetensors file; a byte-level BPE tokenizer
trained on a small corpus made here, with a chat template. No hub is touched.

    python make_model.py DEST [--layers 4] [--hidden 256] [--vocab 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(n: int) -> list[str]:
    """English-looking text from a seeded generator: enough distinct words for the merges."""
    import random

    rng = random.Random(7)
    base = [
        "spot",
        "preemption",
        "node",
        "zone",
        "weights",
        "tensor",
        "fetch",
        "guard",
        "drain",
        "replica",
        "cache",
        "peer",
        "bucket",
        "stream",
        "token",
        "model",
        "serve",
        "llama",
        "notice",
        "window",
        "deadline",
        "request",
        "answer",
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "is",
        "it",
        "that",
        "for",
        "on",
        "with",
        "as",
        "at",
        "by",
        "from",
        "this",
        "be",
        "are",
        "was",
    ]
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = base + [
        "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(n)]


def make_tokenizer(dest: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(4000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dest", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048, help="the tokenizer's size")
    ap.add_argument("--model-vocab", type=int, default=0, help="a larger embedding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default=None, help="e.g. 50MB: several shards + index")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a.dest.mkdir(parents=True, exist_ok=True)
    make_tokenizer(a.dest, a.vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.dest)
    torch.manual_seed(a.seed)
    heads = max(4, a.hidden // 64)
    cfg = LlamaConfig(
        vocab_size=max(len(tok), a.model_vocab),
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 2,
        num_hidden_layers=a.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    kwargs = {"safe_serialization": True}
    if a.shard_size:
        kwargs["max_shard_size"] = a.shard_size
    model.save_pretrained(a.dest, **kwargs)
    print(json.dumps({"dir": str(a.dest), "vocab": len(tok), "params": model.num_parameters()}))


if __name__ == "__main__":
    main()
