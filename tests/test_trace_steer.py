"""`trace` (which features fire on a text) and interventions (`steer`), on the tiny collected store."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.errors import UserError
from featurestore.intervention import Decoding, Edit, edited, next_token_probs, parse_edit, steer
from featurestore.modeling import load_model
from featurestore.tracing import encode, trace


@pytest.fixture(scope="module")
def loaded(tiny):
    net, _ = load_model(str(tiny["model"]), dtype="float32", device="cpu")
    return net, tiny["tokenizer"]


def stored_rows(store, seq_id: int) -> dict[tuple[int, int, int], float]:
    rows = store.sql("SELECT layer, pos, feature, act FROM activations WHERE source = 'transcoder' AND seq_id = ?",
                     [seq_id]).fetchall()
    return {(l, p, f): a for l, p, f, a in rows}


@pytest.mark.parametrize("seq_id", [0, 3, 11])
def test_trace_of_a_stored_sequence_is_the_stores_activations(tiny, seq_id):
    store, row = tiny["store"], tiny["rows"][seq_id]
    prompt, response = row["conversations"][0]["value"], row["conversations"][1]["value"]
    result = store.trace(prompt, model=str(tiny["model"]), response=response)

    stored_ids = [t for (t,) in store.sql("SELECT token_id FROM tokens WHERE seq_id = ? ORDER BY pos", [seq_id]).fetchall()]
    assert result.token_ids == stored_ids
    expected = stored_rows(store, seq_id)
    got = {(int(l), int(p), int(f)): float(a) for l, p, f, a in zip(result.layer, result.pos, result.feature, result.act)}
    assert len(expected) > 20
    assert got.keys() == expected.keys()
    assert got == expected  # bit for bit: the pass is padded like the stored sequence's collection batch
    assert result.stored_seq_id == seq_id
    # per-token and per-feature views agree with the rows
    (layer, pos, feature), act = max(expected.items(), key=lambda kv: kv[1])
    assert result.at(pos)[0]["act"] >= act - 1e-5
    assert any(e["layer"] == layer and e["feature"] == feature for e in result.at(pos))
    along = result.feature_acts(layer, feature)
    assert len(along) == len(stored_ids) and along[pos] == pytest.approx(act, abs=1e-5)
    assert sum(1 for a in along if a > 0) == sum(1 for (l, _, f) in expected if (l, f) == (layer, feature))


def test_trace_raw_text_and_readable_tokens(tiny):
    store = tiny["store"]
    result = store.trace("the sum of é π", model=str(tiny["model"]), format="raw")
    assert result.token_ids[0] == tiny["tokenizer"].bos_token_id  # deepseek store: raw text gets the BOS too
    assert "".join(result.text[1:]) == "the sum of é π" and result.stored_seq_id is None
    top = result.top_features(5)
    assert top and top[0]["max_act"] == pytest.approx(float(result.act.max()))
    as_dict = result.to_dict()
    assert len(as_dict["per_token"]) == len(result.token_ids) and as_dict["features"][0]["acts"]


def test_trace_refuses_bad_input(tiny):
    with pytest.raises(UserError, match="format"):
        tiny["store"].trace("x", model=str(tiny["model"]), format="nope")
    with pytest.raises(UserError, match="response"):
        encode("x", tiny["tokenizer"], "raw", response="y")


def test_parse_edit():
    assert parse_edit("3/17=0") == Edit(3, 17, 0.0)
    assert parse_edit(" 2/5 = 2.5 ") == Edit(2, 5, 2.5)
    assert parse_edit("1=off") == Edit(1, None, 0.0) and parse_edit("all=off") == Edit(None, None, 0.0)
    for bad in ("3/17", "x/1=0", "3=2", "3/1=abc"):
        with pytest.raises(UserError):
            parse_edit(bad)


def test_ablating_a_feature_that_promotes_a_token_lowers_its_probability(tiny, loaded):
    store = tiny["store"]
    net, tokenizer = loaded
    last = store.manifest["model"]["n_layers"] - 1
    ids = encode("wait hmm therefore the answer is", tokenizer, "raw", bos_format="deepseek")
    result = trace("wait hmm therefore the answer is", (net, tokenizer), store, format="raw")
    lens = {(f, side): (t, v) for f, side, t, v in store.sql(
        "SELECT feature, side, token_id, value FROM logit_lens WHERE source = 'transcoder' AND layer = ? AND rank = 0",
        [last]).fetchall()}
    mask = result.layer == last
    score = result.act[mask] * np.array([lens[(int(f), "top")][1] for f in result.feature[mask]])
    best = int(np.argmax(score))
    pos, feature = int(result.pos[mask][best]), int(result.feature[mask][best])
    token = lens[(feature, "top")][0]

    before = next_token_probs(net, ids)
    out = steer(net, tokenizer, ids, [Edit(last, feature, 0.0)], track=[token], decoding=Decoding(max_new_tokens=0))
    tracked = out.positions[pos]["tracked"][0]
    assert tracked["p_base"] == pytest.approx(float(before[pos, token]), rel=1e-5)
    assert tracked["p_edited"] < tracked["p_base"]
    assert out.positions[pos]["kl"] > 0
    # positions before the feature fires are untouched, and the model is restored after the edit
    untouched = [p for p in range(pos) if result.feature_acts(last, feature)[p] == 0]
    assert all(out.positions[p]["kl"] == pytest.approx(0, abs=1e-9) for p in untouched)
    assert torch.equal(next_token_probs(net, ids), before)
    # scaling by 1 changes nothing; doubling raises the token's probability
    assert torch.allclose(next_token_probs(net, ids, [Edit(last, feature, 1.0)]), before, atol=1e-7)
    assert float(next_token_probs(net, ids, [Edit(last, feature, 2.0)])[pos, token]) > float(before[pos, token])


def test_adapter_off_and_continuations_under_the_same_decoding(tiny, loaded):
    net, tokenizer = loaded
    ids = encode("compute the sum of two numbers", tokenizer, "raw", bos_format="deepseek")
    out = steer(net, tokenizer, ids, [parse_edit("all=off")], decoding=Decoding(max_new_tokens=6))
    with torch.inference_mode():
        greedy = net.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.continuation_base == tokenizer.decode(greedy[0, len(ids):].tolist())
    # without any adapter the model is the base MLP model: compare with zeroing every adapter's decoder
    with edited(net, [Edit(None, None, 0.0)]):
        with torch.inference_mode():
            off_logits = net(input_ids=torch.tensor([ids])).logits[0]
    saved = [(m.mlp.transcoder_dec.weight.clone(), m.mlp.transcoder_dec.bias.clone()) for m in net.model.layers]
    try:
        with torch.no_grad():
            for m in net.model.layers:
                m.mlp.transcoder_dec.weight.zero_()
                m.mlp.transcoder_dec.bias.zero_()
            bare = net(input_ids=torch.tensor([ids])).logits[0]
    finally:
        with torch.no_grad():
            for m, (w, b) in zip(net.model.layers, saved):
                m.mlp.transcoder_dec.weight.copy_(w)
                m.mlp.transcoder_dec.bias.copy_(b)
    assert torch.allclose(off_logits, bare, atol=1e-5)
    assert max(p["kl"] for p in out.positions) > 1e-4
    sampled = steer(net, tokenizer, ids, [parse_edit("1=off")], decoding=Decoding(max_new_tokens=5, sample=True, seed=3))
    again = steer(net, tokenizer, ids, [parse_edit("1=off")], decoding=Decoding(max_new_tokens=5, sample=True, seed=3))
    assert (sampled.continuation_base, sampled.continuation_edited) == (again.continuation_base, again.continuation_edited)


def test_cli_trace_and_steer(tiny, capsys):
    import json

    from cli.main import main

    store = str(tiny["store_path"])
    assert main(["trace", "--model", str(tiny["model"]), "--store", store, "--format", "raw", "--json",
                 "the answer is 42"]) == 0
    out = json.loads(capsys.readouterr().out)
    direct = tiny["store"].trace("the answer is 42", model=str(tiny["model"]), format="raw")
    assert out["token_ids"] == direct.token_ids and len(out["per_token"]) == len(direct)
    assert main(["trace", "--model", str(tiny["model"]), "--store", store, "hmm wait"]) == 0
    assert "strongest features" in capsys.readouterr().out
    top = direct.top_features(1)[0]
    assert main(["steer", "--model", str(tiny["model"]), "--store", store, "--format", "raw", "--prompt",
                 "the answer is 42", "--feature", f"{top['layer']}/{top['feature']}=0", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert f"interventions: {top['layer']}/{top['feature']}=0" in text and "edited:" in text and "KL" in text
    assert main(["steer", "--model", str(tiny["model"]), "--prompt", "x", "--feature", "99/1=0"]) == 2
    assert "error: intervention 99/1=0" in capsys.readouterr().err
