"""Prompts and prompt files: the last token of a file is the target and is not part of the prompt."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from featurestore.errors import UserError


@dataclass
class PromptFile:
    path: Path
    tokens: list[int]  # the prompt, BOS first
    target: int  # the file's last token


def ensure_bos(tokenizer, ids: Sequence[int]) -> tuple[list[int], bool]:
    """Prepend BOS (EOS when the tokenizer has none) unless the prompt already starts with a special token.

    Returns the ids and whether position 0 is a special token (the one attribution leaves out).
    """
    ids = [int(i) for i in ids]
    if ids and ids[0] in set(tokenizer.all_special_ids):
        return ids, True
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        return ids, False
    return [int(bos), *ids], True


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> tuple[list[int], bool]:
    """Token ids of ``prompt`` (text or ids) with BOS ensured; at least one token must follow BOS."""
    ids = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
    ids, has_bos = ensure_bos(tokenizer, ids)
    if len(ids) - int(has_bos) < 1:
        raise UserError("the prompt is empty (nothing after the BOS token)")
    return ids, has_bos


def read_prompt_file(path: Path, tokenizer) -> PromptFile:
    """One prompt file: text whose last token is the target. A single final newline is ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path.name} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text:
        raise UserError(f"{path.name} is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise UserError(f"{path.name} has {len(ids)} token; it needs a prompt and then the target token")
    tokens, has_bos = ensure_bos(tokenizer, ids[:-1])
    if len(tokens) - int(has_bos) < 1:
        raise UserError(f"{path.name} has nothing between the BOS token and the target token")
    return PromptFile(path, tokens, int(ids[-1]))


def prompt_files(path: str | Path) -> list[Path]:
    """A ``.txt`` file, or the ``*.txt`` files of a directory in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"no .txt prompt files in {path}")
        return files
    raise UserError(f"prompt path {path} does not exist")
