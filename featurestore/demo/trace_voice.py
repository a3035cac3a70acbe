"""The phrasing of a reasoning model, shared by the demo trace templates.

Real traces are full of openers, hedges ("Hmm", "Wait"), self-corrections, checks and conclusions; the
demo model's features are meant to latch onto such words, so every template speaks through a ``Voice``.
All choices come from the row's seeded ``random.Random``, so the output is reproducible.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Trace:
    """One generated problem: the prompt, the thinking paragraphs and the final answer."""

    prompt: str
    thoughts: list[str]
    answer: str
    source: str
    difficulty: int | None = None


NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Sam", "Elena", "Omar", "Grace", "Noah", "Zoe"]

_OPENERS = [
    "Okay, so I need to {task}.",
    "Alright, let's see. The problem asks me to {task}.",
    "Hmm, let me think. I have to {task}.",
    "Let me start by understanding the problem: I need to {task}.",
    "Okay, let's tackle this. We want to {task}.",
    "So the question is asking me to {task}. Let me work through it step by step.",
]
_HEDGES = ["Hmm.", "Wait.", "Hmm, wait.", "Hold on.", "Let me think again.", "Hmm, let me see.", "Wait a second."]
_SLIPS = [
    "Wait, that doesn't look right.",
    "Hmm, wait. That can't be right.",
    "Hold on, I think I made a mistake.",
    "Wait, no.",
    "Hmm, that seems off.",
]
_CHECKS = [
    "Let me double-check.",
    "Let me verify that.",
    "Wait, let me make sure that's right.",
    "Let me check this another way.",
    "Just to be safe, let me verify.",
]
_CONFIRMS = ["Yes, that matches.", "Okay, that checks out.", "Good, same answer.", "Yep, that's consistent.",
             "Right, that works."]
_CONCLUDES = [
    "So the answer is {x}.",
    "Therefore, the answer should be {x}.",
    "So I'm fairly confident the answer is {x}.",
    "Thus the final answer is {x}.",
    "I think that's it: {x}.",
]
_THENS = ["So", "Then", "Now", "Next,", "Okay, so", "Alright,"]
_DIGRESSIONS = [
    "Hmm, is there a trick here? Sometimes these problems are worded to mislead. Let me reread the question. "
    "No, I think it's straightforward.",
    "Wait, maybe I should consider whether I misread something. Let me go back to the statement. Okay, I "
    "read it correctly.",
    "Let me think about whether this answer is reasonable. It's in the right range, so that's a good sign.",
    "Actually, let me slow down and write out each step explicitly, because it's easy to make an arithmetic "
    "slip here.",
    "Hmm, I wonder if there's a faster way to see this. Maybe, but the direct approach is safer.",
    "Let me also think about edge cases. Nothing unusual seems to happen with these numbers.",
]


class Voice:
    """Random-but-seeded phrasing; ``verbosity`` 0 (terse) to 2 (long, with digressions and re-checks)."""

    def __init__(self, rng: random.Random, verbosity: int):
        self.rng = rng
        self.verbosity = verbosity
        self.on_retrace: dict[str, str | None] = {}  # paragraph -> what a second pass says instead (None: skip)

    def pick(self, options):
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def open(self, task: str) -> str:
        return self.pick(_OPENERS).format(task=task)

    def hedge(self) -> str:
        return self.pick(_HEDGES)

    def then(self) -> str:
        return self.pick(_THENS)

    def check(self) -> str:
        return self.pick(_CHECKS)

    def confirm(self) -> str:
        return self.pick(_CONFIRMS)

    def conclude(self, answer: str) -> str:
        return self.pick(_CONCLUDES).format(x=answer)

    def extra(self) -> bool:
        """Whether to add an optional step: rare when terse, usual when long."""
        return self.chance((0.15, 0.55, 0.95)[self.verbosity])

    def digressions(self) -> list[str]:
        count = (0, self.rng.randint(0, 1), self.rng.randint(2, 4))[self.verbosity]
        chosen = self.rng.sample(_DIGRESSIONS, count)
        self.on_retrace.update(dict.fromkeys(chosen))
        return chosen

    def slip(self, wrong: str, redo: str, plain: str) -> list[str]:
        """Either the plain step, or a wrong step followed by a noticed mistake and the redo."""
        if self.chance((0.15, 0.35, 0.6)[self.verbosity]):
            fixed = f"{self.pick(_SLIPS)} {redo}"
            self.on_retrace.update({wrong: None, fixed: plain})
            return [wrong, fixed]
        return [plain]

    def retrace(self, thoughts: list[str]) -> list[str]:
        """The steps again, as a careful second pass: no digressions, and the slips already fixed."""
        again = [self.on_retrace.get(p, p) for p in thoughts]
        return [p for p in again if p is not None]


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def number(x: float, digits: int = 2) -> str:
    """A decimal without trailing zeros: 2.50 -> 2.5, 3.00 -> 3."""
    text = f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
