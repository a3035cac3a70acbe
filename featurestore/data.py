"""Reasoning-trace datasets in the original JSONL format: validation, hashing, streaming and chat formatting.

A row is ``{"domain", "source", "conversations": [prompt_turn, response_turn], ...}``; only
``conversations[0].value`` and ``conversations[1].value`` are read. The file is validated and hashed once
up front (so a malformed line fails before any compute, naming its line) and then read chunk by chunk
through the byte offsets of its rows, so memory does not grow with the dataset.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

FORMATS = ("deepseek", "qwen", "chat-template")
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


@dataclass
class Row:
    row_index: int
    domain: str
    source: str
    prompt: str
    response: str


@dataclass
class Dataset:
    path: Path
    sha256: str
    offsets: np.ndarray  # byte offset of each row's line
    line_numbers: np.ndarray  # 1-based line number of each row (for messages)

    def __len__(self) -> int:
        return len(self.offsets)

    def rows(self, start: int, stop: int) -> Iterator[Row]:
        with open(self.path, "rb") as handle:
            for i in range(start, min(stop, len(self))):
                handle.seek(int(self.offsets[i]))
                yield parse_row(handle.readline(), i, int(self.line_numbers[i]), self.path, int(self.offsets[i]))


def resolve_data(data: str) -> Path:
    """A local path, or ``hf://owner/repo/path/in/repo.jsonl`` (a dataset repo) through the Hub cache."""
    if data.startswith("hf://"):
        parts = data[len("hf://"):].split("/")
        if len(parts) < 3:
            raise UserError(f"bad Hub data path {data!r}: expected hf://owner/repo/path.jsonl")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
        except Exception as exc:
            raise UserError(f"could not fetch {data} from the Hugging Face Hub ({type(exc).__name__}); "
                            "pass a local .jsonl when offline") from None
    path = Path(data).expanduser()
    if not path.is_file():
        raise UserError(f"data file {data!r} does not exist")
    return path


def parse_row(line: bytes, row_index: int, line_number: int, path: Path, offset: int | None = None) -> Row:
    """One row; ``offset`` (the line's byte offset in the file) lets an encoding error say where it is."""
    where = f"{path.name} line {line_number}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = f"byte offset {offset + exc.start} in the file, " if offset is not None else ""
        raise UserError(f"{where}: invalid UTF-8 ({at}byte {exc.start + 1} of the line: "
                        f"{line[exc.start:exc.end].hex(' ')}); the file must be UTF-8 JSONL") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise UserError(f"{where}: 'conversations' must be a list of at least two turns")
    values = []
    for turn in turns[:2]:
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise UserError(f"{where}: each of the first two turns needs a string 'value'")
        values.append(value)
    return Row(row_index, str(obj.get("domain") or "unknown"), str(obj.get("source") or ""), values[0], values[1])


def open_dataset(data: str) -> Dataset:
    """Validate every row, hash the file and index its rows' offsets in one streaming pass."""
    path = resolve_data(data)
    digest = hashlib.sha256()
    offsets, lines = [], []
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            digest.update(line)
            if line.strip():
                parse_row(line, len(offsets), number, path, offset)
                offsets.append(offset)
                lines.append(number)
            offset += len(line)
    if not offsets:
        raise UserError(f"dataset {data!r} is empty")
    return Dataset(path, digest.hexdigest(), np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64))


def format_text(row: Row, fmt: str, tokenizer) -> str:
    """The text the model sees, exactly as the original pipeline built it."""
    response = row.response
    if response.startswith("<think> "):
        response = "<think>\n" + response[len("<think> "):]
    if fmt == "deepseek":
        return USER + row.prompt + ASSISTANT + response
    if fmt == "qwen":
        return f"<|im_start|>user\n{row.prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
    if fmt == "chat-template":
        messages = [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": response}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:
            raise UserError(f"the tokenizer has no usable chat template: {str(exc).splitlines()[0]}") from None
    raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def adds_special_tokens(fmt: str) -> bool:
    """deepseek text is encoded with the tokenizer's BOS; the qwen and chat-template texts carry their own."""
    return fmt == "deepseek"
