"""What the judges must answer: JSON schemas for structured outputs, and validators for every reply.

The schemas are sent as ``response_format`` (strict json_schema) where the endpoint supports it; the
validators run on every reply whatever the endpoint did, so an out-of-enum value or a missing key is an
invalid answer (asked again, then recorded as an error), never a silent default.
"""
from __future__ import annotations

import json
import re

CATEGORIES = ("language", "domain", "reasoning", "uninterpretable")
CONFIDENCES = ("high", "medium", "low")
DOMAIN_TYPES = ("math", "science", "code")
MECHANISMS = ("output", "input_simple", "input_abstract")
DESCRIPTION_WORDS = (10, 15)  # asked for
DESCRIPTION_WORDS_ACCEPTED = (6, 25)  # accepted without asking again


class AnswerError(ValueError):
    """The reply is not a valid answer; the message says why (it ends up in the error row)."""


def _nullable(kind: str, enum: tuple[str, ...] | None = None) -> dict:
    spec: dict = {"type": [kind, "null"]}
    if enum is not None:
        spec["enum"] = [*enum, None]
    return spec


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


CLASSIFICATION_SCHEMA = _object({
    "reasoning": {"type": "string"},
    "category": {"type": "string", "enum": list(CATEGORIES)},
    "confidence": {"type": "string", "enum": list(CONFIDENCES)},
    "domain_type": _nullable("string", DOMAIN_TYPES),
    "mechanism": _nullable("string", MECHANISMS),
    "category_description": {"type": "string"},
    "mechanism_description": _nullable("string"),
    "input_pattern": _nullable("string"),
    "output_pattern": _nullable("string"),
})

EXPLANATION_SCHEMA = _object({
    "reasoning": {"type": "string"},
    "description": {"type": "string"},
})


def detection_schema(n_items: int) -> dict:
    """One required boolean per excerpt number, so a missing excerpt is invalid rather than 'False'."""
    return _object({str(i): {"type": "boolean"} for i in range(1, n_items + 1)})


_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```\s*$", re.S)


def parse_json_object(text: str | None) -> dict:
    """The reply's JSON object; tolerates code fences and prose around one object (endpoints without schemas)."""
    if text is None or not text.strip():
        raise AnswerError("empty reply")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end <= start:
            raise AnswerError(f"reply is not JSON: {text.strip()[:120]!r}") from None
        try:
            value = json.loads(body[start:end + 1])
        except json.JSONDecodeError as exc:
            raise AnswerError(f"reply is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, dict):
        raise AnswerError(f"reply is JSON {type(value).__name__}, not an object")
    return value


def _text(answer: dict, key: str, required: bool = True) -> str | None:
    value = answer.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise AnswerError(f"{key} is missing")
        return None
    if not isinstance(value, str):
        raise AnswerError(f"{key} is {type(value).__name__}, not a string")
    return value.strip()


def _enum(answer: dict, key: str, allowed: tuple[str, ...], required: bool = True) -> str | None:
    value = answer.get(key)
    if value is None or value == "":
        if required:
            raise AnswerError(f"{key} is missing")
        return None
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise AnswerError(f"{key} {value!r} is not one of {', '.join(allowed)}")
    return value.strip().lower()


def validate_classification(text: str | None) -> dict:
    """Enums checked; ``domain_type`` required for domain and ``mechanism`` for reasoning, dropped otherwise."""
    answer = parse_json_object(text)
    category = _enum(answer, "category", CATEGORIES)
    result = {
        "category": category,
        "confidence": _enum(answer, "confidence", CONFIDENCES),
        "domain_type": _enum(answer, "domain_type", DOMAIN_TYPES, required=category == "domain"),
        "mechanism": _enum(answer, "mechanism", MECHANISMS, required=category == "reasoning"),
        "category_description": _text(answer, "category_description"),
        "mechanism_description": _text(answer, "mechanism_description", required=False),
        "input_pattern": _text(answer, "input_pattern", required=False),
        "output_pattern": _text(answer, "output_pattern", required=False),
        "reasoning": _text(answer, "reasoning", required=False) or "",
    }
    if category != "domain":
        result["domain_type"] = None
    if category != "reasoning":
        result["mechanism"] = None
        result["mechanism_description"] = None
    return result


def validate_explanation(text: str | None) -> dict:
    answer = parse_json_object(text)
    description = _text(answer, "description")
    words = len(description.split())
    low, high = DESCRIPTION_WORDS_ACCEPTED
    if not low <= words <= high:
        raise AnswerError(f"description has {words} words, not {DESCRIPTION_WORDS[0]}-{DESCRIPTION_WORDS[1]}")
    return {"description": description, "reasoning": _text(answer, "reasoning", required=False) or ""}


def validate_detection(text: str | None, n_items: int) -> list[bool]:
    """Predictions for excerpts 1..n in order; every key must be present and a JSON boolean."""
    answer = parse_json_object(text)
    predictions = []
    for i in range(1, n_items + 1):
        value = answer.get(str(i))
        if value is None:
            raise AnswerError(f"no answer for excerpt {i}")
        if not isinstance(value, bool):
            raise AnswerError(f"answer for excerpt {i} is {value!r}, not true or false")
        predictions.append(value)
    extra = sorted(set(answer) - {str(i) for i in range(1, n_items + 1)})
    if extra:
        raise AnswerError(f"answers for excerpts that do not exist: {', '.join(extra[:5])}")
    return predictions
