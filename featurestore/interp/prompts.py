"""The judges' prompts: taxonomy and instructions, evidence rendering, and a version hash over all of it.

Every excerpt — positive, lower-quantile or negative — is rendered by the same function from the store's
token display texts, so no decoding artefact tells positives from negatives. The detection prompt shows
excerpts unmarked and never says how many are active.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from .answers import CLASSIFICATION_SCHEMA, DESCRIPTION_WORDS, EXPLANATION_SCHEMA, detection_schema

if TYPE_CHECKING:
    from .evidence import FeatureEvidence

RENDER_VERSION = 2  # bump when the rendering code below changes what the judge sees
MARK_OPEN, MARK_CLOSE = "<<<", ">>>"
OTHER_ACTIVE_SHOWN = 8

CONTEXT = ("The model is a reasoning language model (a DeepSeek-R1-style distilled Qwen2) with a transcoder adapter "
           "beside each MLP: a sparse feature layer whose features are meant to be interpretable. The text comes "
           "from the model's inputs and reasoning traces on math, code and science problems: a user question, then "
           "the model's thinking between <think> and </think>, then its answer.")

CLASSIFY_SYSTEM = CONTEXT + """

You classify one feature from the evidence given: its top-activating excerpts (activating token marked, activation
values shown), excerpts from lower activation quantiles, the tokens its output direction promotes and suppresses
(logit lens), and where in the data it fires (domain and region of the trace).

Categories (pick exactly one):
- language: generic text flow — punctuation, function words, connectors (therefore, so, then), formatting and
  layout. Generic language that fires ONLY in reasoning-model contexts is not language but reasoning.
- domain: technical content — math, science or code vocabulary, notation or structure. Set domain_type to math,
  science or code.
- reasoning: behaviour specific to reasoning models: (1) uncertainty or hedging ("Hmm", "Wait", "maybe");
  (2) self-correction or backtracking; (3) metacognitive commentary about its own process; (4) verification
  ("Let me check"); (5) think-out-loud verbosity. Features that promote such tokens count too. Plain connectors and
  technical terms do not. Set mechanism:
    output: the feature is best described by what it promotes next (logit lens, what follows the marks);
    input_simple: a token-level trigger (a word or a few fixed tokens);
    input_abstract: a context-dependent trigger (a situation rather than a token).
- uninterpretable: no identifiable trigger or effect in the evidence.

confidence is high, medium or low. domain_type is null unless category is domain; mechanism and
mechanism_description are null unless category is reasoning. input_pattern describes what triggers the feature,
output_pattern what it promotes (null if unclear). Reason first (field reasoning), then answer."""

EXPLAIN_SYSTEM = CONTEXT + f"""

You explain one feature. You see excerpts where it activates; in each, the token where the excerpt was taken is
marked {MARK_OPEN}like this{MARK_CLOSE} with its activation, and other tokens active in the excerpt are listed with
their activations. Find what makes the feature fire: the tokens themselves and the context they appear in.
Write a description of {DESCRIPTION_WORDS[0]} to {DESCRIPTION_WORDS[1]} words that would let someone tell, for a new
excerpt, whether the feature fires somewhere in it. Be specific; do not describe generic properties shared by all
excerpts (they all come from reasoning traces). Reason first (field reasoning), then give the description."""

DETECT_SYSTEM = CONTEXT + """

You test a description of one feature. For each numbered excerpt, decide from the description alone whether the
feature is active on at least one token of the excerpt. Judge every excerpt on its own: any number of them may be
active, from none to all."""

CLASSIFY_TASK = "Classify feature L{layer}F{feature} ({source}, layer {layer})."
EXPLAIN_TASK = "Describe feature L{layer}F{feature} ({source}, layer {layer})."
JSON_CLASSIFY = ("Respond with a JSON object with the keys reasoning, category, confidence, domain_type, mechanism, "
                 "category_description, mechanism_description, input_pattern, output_pattern.")
JSON_EXPLAIN = "Respond with a JSON object with the keys reasoning and description."
JSON_DETECT = ('Respond with a JSON object mapping every excerpt number, "1" to "{n}", to true (the feature is active '
               "somewhere in the excerpt) or false.")


def _version(*parts) -> str:
    blob = json.dumps([RENDER_VERSION, CONTEXT, MARK_OPEN, MARK_CLOSE, OTHER_ACTIVE_SHOWN, *parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


CLASSIFY_VERSION = _version(CLASSIFY_SYSTEM, CLASSIFY_TASK, JSON_CLASSIFY, CLASSIFICATION_SCHEMA)
AUTOINTERP_VERSION = _version(EXPLAIN_SYSTEM, EXPLAIN_TASK, JSON_EXPLAIN, EXPLANATION_SCHEMA, DETECT_SYSTEM,
                              JSON_DETECT, detection_schema(2))


def excerpt_text(example) -> str:
    """The window as the store decodes it, token by token display text joined (identical for every excerpt)."""
    return "".join(example.tokens)


def _char_end(tokens, i: int) -> int:
    """Tokens holding the first bytes of a character show "" (it shows on the token completing it): i..end."""
    j = i
    while not tokens[j] and j + 1 < len(tokens):
        j += 1
    return j


def marked_text(example) -> str:
    tokens = list(example.tokens)
    i = example.train_token_ind
    j = _char_end(tokens, i)
    tokens[i:j + 1] = [f"{MARK_OPEN}{''.join(tokens[i:j + 1])}{MARK_CLOSE}"]
    return "".join(tokens)


def _token(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def other_active(example) -> str:
    """The strongest other active tokens of the window, e.g. ``" so" 2.10, "Wait" 1.05``."""
    pairs = [(act, i) for i, act in enumerate(example.acts) if act > 0 and i != example.train_token_ind]
    pairs.sort(reverse=True)
    tokens = example.tokens
    shown = ", ".join(f"{_token(''.join(tokens[i:_char_end(tokens, i) + 1]))} {act:.2f}"
                      for act, i in pairs[:OTHER_ACTIVE_SHOWN])
    more = f" (+{len(pairs) - OTHER_ACTIVE_SHOWN} more)" if len(pairs) > OTHER_ACTIVE_SHOWN else ""
    return (shown + more) if shown else "none"


def render_example(number: int, example, note: str = "") -> str:
    where = ", ".join(x for x in (example.domain, example.region) if x)
    head = f"Example {number} (act {example.act:.2f}{note}; {where})" if where else f"Example {number} (act {example.act:.2f}{note})"
    return f'{head}:\n"""{marked_text(example)}"""\nOther active tokens: {other_active(example)}'


def _shares(counts: dict[str, int], baseline: dict[str, int]) -> str:
    total, base_total = sum(counts.values()), sum(baseline.values())
    if not total:
        return "none"
    keys = sorted(set(counts) | set(baseline), key=lambda k: (-counts.get(k, 0), -baseline.get(k, 0), str(k)))
    cells = []
    for key in keys:
        share = counts.get(key, 0) / total
        base = baseline.get(key, 0) / base_total if base_total else 0.0
        if share == 0 and base < 0.01:
            continue
        cells.append(f"{key} {100 * share:.1f}% ({100 * base:.1f}%)")
    return ", ".join(cells)


def _logits(pairs: list[tuple[str, float]]) -> str:
    return ", ".join(f"{_token(tok)} ({value:.2f})" for tok, value in pairs) or "not available"


def _examples_block(evidence: "FeatureEvidence", top, lower) -> list[str]:
    lines = [f"Top-activating examples (the token where each excerpt was taken is marked {MARK_OPEN}like this{MARK_CLOSE}):"]
    lines += [render_example(i + 1, ex) for i, ex in enumerate(top)]
    if lower:
        lines.append("Examples from lower activation quantiles (weaker activations, same format):")
        lines += [render_example(len(top) + i + 1, ex, f", quantile {q} of {evidence.n_quantiles}")
                  for i, (q, ex) in enumerate(lower)]
    return lines


def classify_messages(evidence: "FeatureEvidence") -> list[dict]:
    stats = evidence.stats
    lines = [CLASSIFY_TASK.format(layer=evidence.layer, feature=evidence.feature, source=evidence.source), ""]
    lines.append(f"Statistics: active on {100 * stats['activation_freq']:.4g}% of tokens ({stats['activation_count']} "
                 f"activations); max activation {stats['max_act']:.2f}, mean {stats['mean_act']:.2f}.")
    lines.append("Where it fires — share of its activations (share of all tokens in brackets):")
    lines.append(f"  by domain: {_shares(evidence.domain_counts, evidence.domain_baseline)}")
    lines.append(f"  by region: {_shares(evidence.region_counts, evidence.region_baseline)}")
    lines.append("Logit lens (unembedding times the feature's decoder direction; raw scores, not normalised):")
    lines.append(f"  promotes: {_logits(evidence.logit_top)}")
    lines.append(f"  suppresses: {_logits(evidence.logit_bottom)}")
    lines.append("")
    lines += _examples_block(evidence, evidence.top, evidence.lower)
    lines += ["", JSON_CLASSIFY]
    return [{"role": "system", "content": CLASSIFY_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def explain_messages(evidence: "FeatureEvidence") -> list[dict]:
    lines = [EXPLAIN_TASK.format(layer=evidence.layer, feature=evidence.feature, source=evidence.source), ""]
    lines += _examples_block(evidence, evidence.top, evidence.lower)
    lines += ["", JSON_EXPLAIN]
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def detect_messages(description: str, texts: list[str]) -> list[dict]:
    """``texts``: the excerpts in the order shown, each rendered unmarked by ``excerpt_text``."""
    lines = [f"Description of the feature: {description}", ""]
    for i, text in enumerate(texts):
        lines.append(f'Excerpt {i + 1}:\n"""{text}"""')
    lines += ["", JSON_DETECT.format(n=len(texts))]
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


# ---- fuzzing: is the marking of each excerpt right for the description?

FUZZ_SYSTEM = CONTEXT + f"""

You test a description of one feature. In each numbered excerpt some tokens are marked {MARK_OPEN}like this{MARK_CLOSE}.
Decide from the description alone whether the marked tokens are the ones where a feature with this description
would be active: true when the marking fits the description, false when the marked tokens are not where such a
feature would fire. Judge every excerpt on its own: any number of markings may be right, from none to all."""

JSON_FUZZ = ('Respond with a JSON object mapping every excerpt number, "1" to "{n}", to true (the marking is right '
             "for the description) or false.")
FUZZ_VERSION = _version(FUZZ_SYSTEM, JSON_FUZZ, detection_schema(2))


def fuzz_text(tokens: list[str], marked: list[int]) -> str:
    """The window's tokens joined, each run of consecutive marked tokens wrapped once in the marks."""
    out, inside, chosen = [], False, set(marked)
    for i, token in enumerate(tokens):
        if i in chosen and not inside:
            out.append(MARK_OPEN)
            inside = True
        elif i not in chosen and inside:
            out.append(MARK_CLOSE)
            inside = False
        out.append(token)
    if inside:
        out.append(MARK_CLOSE)
    return "".join(out)


def fuzz_messages(description: str, texts: list[str]) -> list[dict]:
    """``texts``: the excerpts in the order shown, each rendered by ``fuzz_text``."""
    lines = [f"Description of the feature: {description}", ""]
    for i, text in enumerate(texts):
        lines.append(f'Excerpt {i + 1}:\n"""{text}"""')
    lines += ["", JSON_FUZZ.format(n=len(texts))]
    return [{"role": "system", "content": FUZZ_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
