"""A tiny causal LM built on the spot: for examples, tests and a first try without the default model.

:func:`tiny_model_dir` saves a 2-layer Llama with random weights and a byte-level
BPE tokenizer trained on a few sentences (no download, a second or two on a
CPU) and returns its folder, which ``score(model=...)`` and ``--model`` accept
like any saved model. Its statistics are those of an untrained model: good for
checking that the pipeline runs, meaningless as an audit.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

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


def train_tokenizer(vocab_size: int = 300) -> Any:
    """A fast byte-level BPE tokenizer (any text encodes) trained on :data:`TRAINING_TEXT`, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(directory: str | Path, *, kind: str = "llama", seed: int = 0, vocab_extra: int = 0,
                    **overrides: Any) -> Path:
    """A 2-layer model of the given family (``llama`` or ``gemma2``) with a freshly trained tokenizer, saved to
    ``directory``. ``vocab_extra`` rows beyond the tokenizer's vocabulary; ``overrides`` go to the config."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as scoring does: no "Writing model shards" bar
    directory = Path(directory)
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
        raise ValueError(f"kind {kind!r}: use 'llama' or 'gemma2'")
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # make the distributions less flat than a fresh init
        model.get_output_embeddings().weight.mul_(40.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_model_dir(directory: str | Path | None = None) -> str:
    """The folder of a tiny Llama (:func:`save_tiny_model`): ``directory``, or one temporary folder per process.

    The temporary folder is made on the first call and removed when the process exits.

    Examples
    --------
    >>> from reweight_audit.testing import tiny_model_dir
    >>> import os
    >>> sorted(f for f in os.listdir(tiny_model_dir()) if f.endswith(".json"))[:2]
    ['config.json', 'generation_config.json']
    """
    if directory is not None:
        return str(save_tiny_model(directory))
    return _temporary_tiny_model()


@lru_cache(maxsize=1)
def _temporary_tiny_model() -> str:
    folder = Path(tempfile.mkdtemp(prefix="reweight-audit-tiny-"))
    atexit.register(shutil.rmtree, folder, True)
    return str(save_tiny_model(folder / "tiny-llama"))
