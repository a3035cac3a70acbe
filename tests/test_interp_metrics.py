"""Detection metrics, bootstrap summaries, answer validation and prompt rendering (no store, no server)."""
from __future__ import annotations

import json

import pytest

from featurestore.features import Example
from featurestore.interp.answers import (AnswerError, detection_schema, validate_classification, validate_detection,
                                         validate_explanation)
from featurestore.interp.autointerp import control_donors
from featurestore.interp.metrics import Confusion, bootstrap_mean, format_summary, summarize
from featurestore.interp.prompts import detect_messages, excerpt_text, marked_text, other_active

T, F = True, False


def test_confusion_and_scores_match_hand_computation():
    labels = [T, T, T, F, F, F, F]
    preds = [T, F, T, T, F, F, F]
    c = Confusion.of(labels, preds)
    assert (c.tp, c.fn, c.fp, c.tn) == (2, 1, 1, 3)
    s = c.scores()
    assert s["accuracy"] == pytest.approx(5 / 7)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)


def test_zero_division_conventions():
    nothing_predicted = Confusion.of([T, T, F, F], [F, F, F, F]).scores()
    assert nothing_predicted == {"accuracy": 0.5, "balanced_accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    all_yes = Confusion.of([T, F, F, F], [T, T, T, T]).scores()
    assert all_yes["precision"] == 0.25 and all_yes["recall"] == 1.0
    assert all_yes["balanced_accuracy"] == 0.5  # always saying yes is chance, whatever the base rate
    assert all_yes["f1"] == pytest.approx(2 * 0.25 / 1.25)


def test_bootstrap_mean_and_ci():
    constant = bootstrap_mean([0.7] * 20)
    assert constant["mean"] == pytest.approx(0.7) and constant["ci_low"] == pytest.approx(0.7) == constant["ci_high"]
    spread = bootstrap_mean([0.0, 1.0] * 50, seed=3)
    assert spread["mean"] == 0.5 and spread["ci_low"] < 0.5 < spread["ci_high"]
    assert spread == bootstrap_mean([0.0, 1.0] * 50, seed=3)  # seeded
    assert bootstrap_mean([])["mean"] is None
    assert bootstrap_mean([0.4])["ci_low"] is None


def test_summarize_skips_failed_rows_and_separates_controls():
    rows = [{"status": "ok", "condition": "top", "control": False, "accuracy": a, "balanced_accuracy": a, "precision": a,
             "recall": a, "f1": a} for a in (0.6, 0.8)]
    rows.append({"status": "error", "condition": "top", "control": False, "accuracy": None})
    rows.append({"status": "ok", "condition": "top", "control": True, "accuracy": 0.5, "balanced_accuracy": 0.5,
                 "precision": 0.5, "recall": 0.5, "f1": 0.5})
    lines = summarize(rows)
    assert [(l["condition"], l["control"], l["n_features"]) for l in lines] == [("top", False, 2), ("top", True, 1)]
    assert lines[0]["accuracy"]["mean"] == pytest.approx(0.7)
    text = format_summary(lines)
    assert "control top" in text and "0.700" in text


def test_classification_validation():
    good = {"reasoning": "r", "category": "Domain", "confidence": "high", "domain_type": "math",
            "mechanism": "output", "category_description": "numbers", "mechanism_description": "x",
            "input_pattern": None, "output_pattern": None}
    result = validate_classification(json.dumps(good))
    assert result["category"] == "domain" and result["domain_type"] == "math"
    assert result["mechanism"] is None and result["mechanism_description"] is None  # only kept for reasoning
    with pytest.raises(AnswerError, match="domain_type is missing"):
        validate_classification(json.dumps({**good, "domain_type": None}))
    with pytest.raises(AnswerError, match="mechanism is missing"):
        validate_classification(json.dumps({**good, "category": "reasoning", "mechanism": None}))
    with pytest.raises(AnswerError, match="confidence 'sure'"):
        validate_classification(json.dumps({**good, "confidence": "sure"}))
    fenced = "```json\n" + json.dumps({**good, "category": "language"}) + "\n```"
    assert validate_classification(fenced)["domain_type"] is None
    with pytest.raises(AnswerError, match="empty"):
        validate_classification("")


def test_explanation_and_detection_validation():
    assert validate_explanation('{"reasoning": "", "description": "fires on Wait at the start of a new line of thought in math"}')
    with pytest.raises(AnswerError, match="2 words"):
        validate_explanation('{"reasoning": "", "description": "Wait tokens"}')
    assert validate_detection('{"1": true, "2": false, "3": true}', 3) == [T, F, T]
    with pytest.raises(AnswerError, match="no answer for excerpt 3"):
        validate_detection('{"1": true, "2": false}', 3)
    with pytest.raises(AnswerError, match="not true or false"):
        validate_detection('{"1": true, "2": "yes"}', 2)
    with pytest.raises(AnswerError, match="do not exist"):
        validate_detection('{"1": true, "2": false, "7": true}', 2)
    schema = detection_schema(3)
    assert schema["required"] == ["1", "2", "3"] and schema["properties"]["2"] == {"type": "boolean"}


def _example(tokens, acts, ind):
    return Example(seq_id=1, pos=10, act=acts[ind], token_ids=list(range(len(tokens))), tokens=tokens, acts=acts,
                   train_token_ind=ind, domain="math", region="thinking")


def test_rendering_marks_only_for_the_explainer_and_states_no_base_rate():
    ex = _example(["Let", " me", " check", "\\xe2"], [0.0, 1.5, 4.0, 0.5], 2)
    assert marked_text(ex) == "Let me<<< check>>>\\xe2"
    assert other_active(ex) == '" me" 1.50, "\\\\xe2" 0.50'
    assert excerpt_text(ex) == "Let me check\\xe2"
    system, user = detect_messages("fires on check", [excerpt_text(ex), excerpt_text(ex)])
    assert "<<<" not in user["content"] and "exactly" not in (system["content"] + user["content"]).lower()
    assert 'Excerpt 2:\n"""Let me check\\xe2"""' in user["content"]


def test_control_donors_are_a_derangement():
    keys = [(0, f) for f in range(7)] + [(1, 3)]
    donors = control_donors(keys, seed=1)
    assert sorted(donors) == sorted(keys) and sorted(donors.values()) == sorted(keys)
    assert all(k != v for k, v in donors.items())
    assert donors == control_donors(list(reversed(keys)), seed=1)
    assert control_donors([(0, 1)], seed=1) == {}


def test_one_process_per_run(tmp_path):
    from featurestore.errors import UserError
    from featurestore.interp.runner import RunLock

    first = RunLock(tmp_path, "r1")
    with pytest.raises(UserError, match="another process"):
        RunLock(tmp_path, "r1")
    RunLock(tmp_path, "r2").release()
    first.release()
    RunLock(tmp_path, "r1").release()
