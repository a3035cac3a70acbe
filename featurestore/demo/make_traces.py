"""Generate the bundled demo dataset, traces.jsonl, deterministically (same seed, same bytes).

Rows follow the original validation JSONL schema: ``{"domain", "source", "conversations": [user, assistant],
"needs_truncation"}`` (code rows also carry ``difficulty``), with the response shaped like a DeepSeek-R1 trace:
``<think>\\n...reasoning...\\n</think>\\n\\nanswer``. Domains are mixed about 70/20/10 like the original
stratified split; a few rows stop mid-thought with no ``</think>`` (incomplete traces), and a few are long.

Rewrite the committed file after changing a template with ``python -m featurestore.demo.make_traces``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from . import trace_code, trace_math, trace_science
from .trace_voice import Trace, Voice

SEED = 20260218
N_ROWS = 350
DOMAIN_SHARES = (("math", 0.70, trace_math.GENERATORS), ("code", 0.20, trace_code.GENERATORS),
                 ("science", 0.10, trace_science.GENERATORS))
N_INCOMPLETE = 10
VERBOSITY_WEIGHTS = (0.3, 0.58, 0.12)  # terse, normal, long
OUTPUT = Path(__file__).with_name("traces.jsonl")

_REDO_INTROS = [
    "Actually, let me go through the whole thing once more from the start, just to be sure I didn't slip "
    "anywhere.",
    "Hmm, before I commit to this, let me redo everything carefully.",
    "Wait, I want to be really sure. Let me retrace every step.",
]


def _response(trace: Trace, v: Voice) -> str:
    thoughts = list(trace.thoughts)
    if v.verbosity == 2 and v.chance(0.5):  # the re-checking loops that make real traces long
        thoughts += [v.pick(_REDO_INTROS)] + v.retrace(trace.thoughts[1:-1]) + [f"{v.confirm()} {trace.thoughts[-1]}"]
    return "<think>\n" + "\n\n".join(thoughts) + "\n</think>\n\n" + trace.answer


def _cut_short(response: str, rng: random.Random) -> str:
    """An incomplete trace: the thinking stops mid-sentence, with no closing tag and no answer."""
    thinking = response[: response.index("\n</think>")]
    cut = rng.randint(len(thinking) // 3, max(len(thinking) // 3 + 1, len(thinking) * 4 // 5))
    space = thinking.rfind(" ", 0, cut)
    return thinking[: space if space > len("<think>\n") else cut]


def _row(domain: str, trace: Trace, response: str) -> dict:
    row = {"domain": domain, "source": trace.source,
           "conversations": [{"from": "user", "value": trace.prompt}, {"from": "assistant", "value": response}],
           "needs_truncation": False}
    if trace.difficulty is not None:
        row["difficulty"] = trace.difficulty
    return row


def build_rows(seed: int = SEED, n_rows: int = N_ROWS) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    remaining = n_rows
    for index, (domain, share, generators) in enumerate(DOMAIN_SHARES):
        count = remaining if index == len(DOMAIN_SHARES) - 1 else round(n_rows * share)
        remaining -= count
        for i in range(count):
            generator = generators[i % len(generators)]  # every template appears, in a fixed rotation
            voice = Voice(rng, rng.choices((0, 1, 2), VERBOSITY_WEIGHTS)[0])
            trace = generator(rng, voice)
            rows.append(_row(domain, trace, _response(trace, voice)))
    rng.shuffle(rows)
    for i in sorted(rng.sample(range(len(rows)), N_INCOMPLETE)):
        turn = rows[i]["conversations"][1]
        turn["value"] = _cut_short(turn["value"], rng)
    return rows


def render(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def main() -> None:
    data = render(build_rows())
    OUTPUT.write_bytes(data)
    print(f"wrote {OUTPUT} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
