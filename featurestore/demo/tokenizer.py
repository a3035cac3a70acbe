"""The demo tokenizer: byte-level BPE trained in code on the bundled traces, with the DeepSeek-R1 markers.

Byte-level BPE (like Qwen's) can encode any text and decodes back to it exactly; the pre-tokenizer splits
digits one by one, as Qwen2's does. The chat markers are special tokens; ``<think>`` and ``</think>`` are
added as ordinary (non-special) single tokens, as in DeepSeek-R1-Distill checkpoints, so they survive
``skip_special_tokens``. Training is deterministic: the same traces give the same vocabulary and ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]  # ids 0..3
VOCAB_SIZE = 1536  # at most, including the two think tags appended after training
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def traces_path() -> Path:
    return Path(__file__).with_name("traces.jsonl")


def training_texts(path: Path | None = None) -> Iterator[str]:
    """Prompts and responses of the bundled traces, without the think tags (they are whole tokens anyway)."""
    with open(path or traces_path(), encoding="utf-8") as handle:
        for line in handle:
            turns = json.loads(line)["conversations"]
            yield turns[0]["value"]
            yield turns[1]["value"].replace(THINK_START, "").replace(THINK_END, "")


def train_tokenizer(path: Path | None = None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 2,
        min_frequency=2,
        special_tokens=[AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(path), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False, single_word=False, lstrip=False,
                                     rstrip=False) for tag in (THINK_START, THINK_END)])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)])
    return tokenizer


def build_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train the demo tokenizer; with ``out_dir``, save it there (``AutoTokenizer.from_pretrained`` reads it back)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast
