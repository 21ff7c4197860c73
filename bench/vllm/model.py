"""Write the bench's Llama: random BF16 weights, a byte-level BPE tokenizer trained here.

Runs under the engines venv (transformers, tokenizers, torch). The recipe of ENGINES.md at a
size where the weight phase is visible: hidden 768, 8 layers, vocab 32000 (~212 MB of BF16).

    python bench/vllm/model.py DEST [--hidden 768] [--layers 8] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus() -> list[str]:
    text = (
        "the quick brown fox jumps over a lazy dog while spot instances come and go "
        "weights stream from the bucket into memory and the server answers every request "
        "before the notice deadline arrives"
    )
    words = text.split()
    lines = []
    for i in range(4000):
        lines.append(" ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 9)))
        lines.append(f"{i} {i * 31 % 997} {hex(i)} {i / 7:.3f}")
    return lines


def write_tokenizer(dest: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)


def write_model(dest: Path, hidden: int, layers: int, vocab: int, tok_vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 or hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    write_tokenizer(dest, tok_vocab)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dest", type=Path)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokenizer-vocab", type=int, default=2048)
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    write_model(args.dest, args.hidden, args.layers, args.vocab, args.tokenizer_vocab)
    files = {f.name: f.stat().st_size for f in sorted(args.dest.iterdir()) if f.is_file()}
    print(json.dumps({"files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
