"""Shared fixtures: tiny models built from a config and tokenizers trained on the spot (no network)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "Let x be the number of strings of length n. Then x_1 = 3 and the answer is 41.",
    "We compute the sum of the first 10 odd numbers: 1 + 3 + 5 + ... + 19 = 100.",
    "umm so basically the triangle has sides 3, 4 and 5, you know, a right triangle.",
    "Thus the probability is $\\frac{1}{2}$ and hence the expected value equals 7.",
    "The function f(x) = x^2 is convex; actually, essentially every quadratic with a > 0 is.",
    "数学 是 有趣 的 😀 café naïve résumé",
]


def train_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(directory: Path, *, kind: str = "llama", seed: int = 0, vocab_extra: int = 0, **overrides) -> Path:
    """A 2-layer model of the given family with a freshly trained tokenizer, saved to ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    vocab = len(tokenizer) + vocab_extra
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False, **overrides)
    elif kind == "gemma2":
        from transformers import Gemma2Config

        config = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                              final_logit_softcapping=3.0, **overrides)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # make the distributions less flat than a fresh init
        model.get_output_embeddings().weight.mul_(40.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_noisy(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@pytest.fixture()
def noisy_rows() -> list[dict]:
    rows = []
    texts = [
        ("How many?", "Let x be the umm number of strings. Then x_1 = 3 and the answer is 41."),
        ("Sum?", "We compute the basically sum of the first 10 odd numbers: it is 100."),
        ("Prob?", "Thus the probability is $\\frac{1}{2}$ and hence, you know, the value equals 7."),
        ("Clean", "The function f(x) = x^2 is convex."),
    ]
    for i, (prompt, response) in enumerate(texts):
        spans = []
        for word in ("umm", "basically", "you know"):
            at = response.find(word)
            if at >= 0:
                spans.append({"start": at, "end": at + len(word), "kind": "filler" if word != "basically" else "hedge", "text": word})
        rows.append({"id": f"s{i}", "prompt": prompt, "response": response, "clean_response": response, "spans": spans, "meta": {}})
    return rows
