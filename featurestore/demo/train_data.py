"""Training data for the demo models, cut from the bundled traces.

Every ``heldout_every``-th trace is held out for evaluation. The base model sees prompts and answers only
(``<think>`` ... ``</think>`` removed: the model that never learned to reason aloud); the reasoning model and the
adapters see whole traces. Training streams are the documents concatenated, each starting with BOS, and
batches are windows at seeded random offsets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokenizer import ASSISTANT, THINK_END, THINK_START, USER, traces_path


@dataclass
class Doc:
    full: list[int]  # BOS, prompt, assistant marker, <think> ... </think> answer, EOS (no EOS when incomplete)
    base: list[int] | None  # BOS, prompt, assistant marker, answer, EOS; None for an incomplete trace
    thinking: list[bool]  # per position of ``full``: is this token inside the thinking (after <think>, to </think>)


def read_rows(path: Path | None = None, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (path or traces_path()).read_text(encoding="utf-8").splitlines()]
    return rows[:limit] if limit else rows


def encode_docs(tokenizer, rows: list[dict]) -> list[Doc]:
    think_start = tokenizer.convert_tokens_to_ids(THINK_START)
    think_end = tokenizer.convert_tokens_to_ids(THINK_END)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    docs = []
    for row in rows:
        prompt, response = (turn["value"] for turn in row["conversations"])
        full = [bos] + tokenizer.encode(USER + prompt + ASSISTANT + response, add_special_tokens=False)
        base = None
        if THINK_END in response:
            full.append(eos)
            answer = response.split(THINK_END, 1)[1].lstrip("\n")
            base = [bos] + tokenizer.encode(USER + prompt + ASSISTANT + answer, add_special_tokens=False) + [eos]
        inside, thinking = False, []
        for token in full:
            if token == think_start:
                thinking.append(False)
                inside = True
            else:
                thinking.append(inside)
                if token == think_end:
                    inside = False
        docs.append(Doc(full, base, thinking))
    return docs


def split(docs: list[Doc], heldout_every: int) -> tuple[list[Doc], list[Doc]]:
    train = [d for i, d in enumerate(docs) if i % heldout_every != heldout_every - 1]
    heldout = [d for i, d in enumerate(docs) if i % heldout_every == heldout_every - 1]
    return train, heldout


def stream(sequences: list[list[int]], gen: torch.Generator) -> torch.Tensor:
    """The sequences in a seeded order, concatenated into one token stream."""
    order = torch.randperm(len(sequences), generator=gen).tolist()
    return torch.tensor([t for i in order for t in sequences[i]], dtype=torch.long)


def windows(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len + 1`` tokens (inputs and their next tokens) at seeded offsets."""
    width = min(seq_len + 1, len(tokens))
    starts = torch.randint(0, len(tokens) - width + 1, (batch_size,), generator=gen)
    return torch.stack([tokens[s:s + width] for s in starts.tolist()])


def padded(docs: list[Doc], pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out documents as a right-padded batch: ids, attention mask, thinking mask (all (B, T))."""
    width = min(max_len, max(len(d.full) for d in docs))
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.bool)
    thinking = torch.zeros(len(docs), width, dtype=torch.bool)
    for row, doc in enumerate(docs):
        n = min(width, len(doc.full))
        ids[row, :n] = torch.tensor(doc.full[:n])
        mask[row, :n] = True
        thinking[row, :n] = torch.tensor(doc.thinking[:n])
    return ids, mask, thinking
