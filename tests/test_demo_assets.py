"""The embedded demo assets: bundled traces, the trained tokenizer, and the checkpoint build's caching."""
from __future__ import annotations

import collections
import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from featurestore.demo import TRACES_PATH, build_demo_checkpoint, build_tokenizer
from featurestore.demo import checkpoint as demo_checkpoint
from featurestore.demo.make_traces import build_rows, render
from featurestore.demo.tokenizer import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER
from featurestore.errors import UserError

MARKERS = [BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END]


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in TRACES_PATH.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-tokenizer")
    build_tokenizer(out)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Fake builds must never reach the real build cache."""
    monkeypatch.setenv("FEATURESTORE_DEMO_CACHE", str(tmp_path / "cache"))


def deepseek_text(row) -> str:
    turns = row["conversations"]
    return USER + turns[0]["value"] + ASSISTANT + turns[1]["value"]


def test_traces_file_is_small_valid_and_mixed(rows):
    assert TRACES_PATH.stat().st_size < 1_000_000
    assert 300 <= len(rows) <= 400
    domains = collections.Counter(row["domain"] for row in rows)
    assert set(domains) == {"math", "code", "science"}
    assert domains["math"] > domains["code"] > domains["science"] > 0
    assert abs(domains["math"] / len(rows) - 0.70) < 0.05
    incomplete, reasoning_words = 0, 0
    for row in rows:
        assert row["needs_truncation"] is False and isinstance(row["source"], str)
        user, assistant = row["conversations"]
        assert (user["from"], assistant["from"]) == ("user", "assistant") and user["value"]
        response = assistant["value"]
        assert response.startswith("<think>\n")
        if THINK_END in response:
            thinking, answer = response.split("\n</think>\n\n")
            assert answer.strip()
            reasoning_words += any(w in thinking for w in ("So ", "so ", "Therefore", "Wait", "Hmm", "Then"))
        else:
            incomplete += 1
    assert 0.01 * len(rows) <= incomplete <= 0.05 * len(rows)
    assert reasoning_words >= 0.9 * (len(rows) - incomplete)
    assert sum("Wait" in row["conversations"][1]["value"] for row in rows) > 30  # self-corrections are common


def test_traces_file_is_what_the_generator_writes():
    assert render(build_rows()) == TRACES_PATH.read_bytes()


def test_markers_are_single_tokens(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    ids = [tokenizer.encode(marker, add_special_tokens=False) for marker in MARKERS]
    assert all(len(i) == 1 for i in ids), ids
    assert len({i[0] for i in ids}) == len(MARKERS)
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOS and tokenizer.pad_token == EOS
    # think tags stay whole inside running text, and are not dropped as special tokens
    think_id = tokenizer.convert_tokens_to_ids(THINK_START)
    encoded = tokenizer.encode("Hmm<think>so</think>x", add_special_tokens=False)
    assert think_id in encoded and tokenizer.convert_tokens_to_ids(THINK_END) in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "Hmm<think>so</think>x"
    assert 1000 <= len(tokenizer) <= 4000


def test_bos_is_prepended_and_nothing_appended(tokenizer):
    text = USER + "What is 2+2?" + ASSISTANT + "<think>\nEasy.\n</think>\n\n4"
    with_special = tokenizer.encode(text, add_special_tokens=True)
    without = tokenizer.encode(text, add_special_tokens=False)
    assert with_special == [tokenizer.bos_token_id] + without
    assert without[0] == tokenizer.convert_tokens_to_ids(USER)
    assert tokenizer.eos_token_id not in with_special


def test_tokenizer_round_trips_every_trace(tokenizer, rows):
    partial_utf8_tokens = 0
    for row in rows:
        text = deepseek_text(row)
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert tokenizer.decode(ids) == BOS + text
        for turn in row["conversations"]:
            assert tokenizer.decode(tokenizer.encode(turn["value"], add_special_tokens=False)) == turn["value"]
        partial_utf8_tokens += sum("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert partial_utf8_tokens > 0  # byte-level: some tokens are pieces of a multi-byte character (°, π, ...)


def test_tokenizer_training_is_deterministic():
    assert build_tokenizer().backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()


def _fake_build(out_dir, config=None, progress=True):
    out_dir.mkdir(parents=True)
    for name in demo_checkpoint.REQUIRED_FILES:
        (out_dir / name).write_text("fake")
    return {}


def test_complete_build_is_reused_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_checkpoint, "train_demo", _fake_build)
    first = build_demo_checkpoint(tmp_path / "first")
    assert demo_checkpoint.is_complete(first)
    assert demo_checkpoint.is_complete(tmp_path / "cache" / demo_checkpoint.TrainConfig().key())

    def must_not_build(*args, **kwargs):
        raise AssertionError("retrained a cached build")

    monkeypatch.setattr(demo_checkpoint, "train_demo", must_not_build)
    assert build_demo_checkpoint(first) == first
    second = build_demo_checkpoint(tmp_path / "second")  # a new directory is filled from the cache
    assert (second / "config.json").read_text() == "fake"
    with pytest.raises(AssertionError, match="retrained"):
        build_demo_checkpoint(first, rebuild=True)
    assert demo_checkpoint.is_complete(first)  # a failed rebuild leaves the old build in place


def test_stale_build_is_replaced_and_foreign_dir_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_checkpoint, "train_demo", _fake_build)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / demo_checkpoint.MARKER).write_text(json.dumps({"version": "featurestore-demo/1"}))
    (stale / "leftover.bin").write_text("x")
    assert build_demo_checkpoint(stale) == stale
    assert demo_checkpoint.is_complete(stale) and not (stale / "leftover.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "stale"]  # no staging or retired dirs left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a demo checkpoint"):
        build_demo_checkpoint(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_interrupted_build_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    def crash(out_dir, config=None, progress=True):
        _fake_build(out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_checkpoint, "train_demo", crash)
    with pytest.raises(KeyboardInterrupt):
        build_demo_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
