"""The Python API's edges: out-of-range handles, dead features, the per-sequence cap and readable examples."""
from __future__ import annotations

import pytest

from featurestore.errors import UserError
from featurestore.features import Example

from conftest import build_tiny_model


@pytest.fixture(scope="module")
def sparse(tiny, tmp_path_factory):
    """A store of a model whose strongly negative encoder bias leaves features dead, with a few sampled neurons."""
    import featurestore as fs

    root = tmp_path_factory.mktemp("sparse")
    model = build_tiny_model(root / "model", tiny["tokenizer"], layers=2, enc_bias=-3.0)
    options = dict(chunk_size=8, batch_tokens=512, progress=False, max_samples=8)
    fs.collect(str(model), str(tiny["data"]), root / "store", **options)
    return fs.collect(str(model), str(tiny["data"]), root / "store", source="neuron", neurons_per_layer=5, seed=1,
                      layers=[1], **options)


def test_out_of_range_and_missing_source_name_the_valid_range(tiny):
    store = tiny["store"]
    with pytest.raises(UserError, match=r"layer 9 out of range: this store holds transcoder layers 0-2"):
        store.feature(9, 1)
    with pytest.raises(UserError, match=r"feature 5000 out of range: layer 0 has features 0-47"):
        store.feature(0, 5000)
    with pytest.raises(UserError, match=r"feature -1 out of range"):
        store.feature(0, -1)
    with pytest.raises(UserError, match=r"no neuron activations \(sources: transcoder\)"):
        store.feature(0, 1, source="neuron")


def test_dead_feature_has_zero_counts_and_says_so(sparse):
    store = sparse
    live = {(l, f) for l, f in store.sql("SELECT layer, feature FROM features WHERE source='transcoder'").fetchall()}
    dead = [(l, f) for l in range(2) for f in range(48) if (l, f) not in live]
    assert dead, "the tiny model has no dead feature to test with"
    stats = store.feature(*dead[0]).stats()
    assert stats == {"activation_count": 0, "activation_freq": 0.0, "max_act": 0.0, "mean_act": 0.0, "dead": True}
    assert store.feature(*dead[0]).top_examples(5) == []
    layer, feature = sorted(live)[0]
    live_stats = store.feature(layer, feature).stats()
    assert live_stats["dead"] is False and live_stats["activation_count"] > 0


def test_neuron_handles_name_the_sampled_layers_and_neurons(sparse):
    sampled = sparse.manifest["sources"]["neuron"]["neurons"]["1"]
    with pytest.raises(UserError, match=r"layer 0 out of range: this store holds neuron layers 1$"):
        sparse.feature(0, sampled[0], source="neuron")
    missing = next(n for n in range(64) if n not in sampled)
    with pytest.raises(UserError, match=rf"neuron {missing} of layer 1 was not sampled: layer 1 holds 5 of neurons 0-63"):
        sparse.feature(1, missing, source="neuron")
    assert sparse.feature(1, sampled[0], source="neuron").stats()["activation_count"] >= 0


def _busiest(store):
    """A feature with several activations in one sequence (so the per-sequence cap matters)."""
    return store.sql("""SELECT layer, feature FROM activations WHERE source = 'transcoder'
                        GROUP BY layer, feature, seq_id ORDER BY count(*) DESC, layer, feature LIMIT 1""").fetchall()[0]


def test_max_per_sequence_caps_top_examples(tiny):
    store = tiny["store"]
    layer, feature = _busiest(store)
    handle = store.feature(layer, feature)
    uncapped = handle.top_examples(20, max_per_sequence=None)
    capped = handle.top_examples(20, max_per_sequence=1)
    per_seq = {}
    for e in uncapped:
        per_seq[e.seq_id] = per_seq.get(e.seq_id, 0) + 1
    assert max(per_seq.values()) > 1
    assert len({e.seq_id for e in capped}) == len(capped)
    # the capped list is each sequence's best activation, highest first, ties by seq_id
    best = store.sql(f"""SELECT seq_id, max(act) AS a FROM activations WHERE source='transcoder' AND layer={layer}
                         AND feature={feature} GROUP BY seq_id ORDER BY a DESC, seq_id LIMIT 20""").fetchall()
    assert [(e.seq_id, e.act) for e in capped] == [(s, pytest.approx(a)) for s, a in best]
    default = handle.top_examples(20)  # at most 2 per sequence: the uncapped order with each sequence's third on dropped
    seen, expected = {}, []
    for e in uncapped + handle.top_examples(10_000, max_per_sequence=None)[20:]:
        seen[e.seq_id] = seen.get(e.seq_id, 0) + 1
        if seen[e.seq_id] <= 2:
            expected.append((e.seq_id, e.pos))
    assert [(e.seq_id, e.pos) for e in default] == expected[:20]
    with pytest.raises(UserError, match="max_per_sequence"):
        handle.top_examples(5, max_per_sequence=0)


def test_example_text_merges_split_characters_and_html_escapes():
    omega = "Ω".encode()
    example = Example(seq_id=3, pos=2, act=2.0, token_ids=[1, 2, 3, 4], tokens=["A 40", " \\xce", "\\xa9", " <b>&"],
                      acts=[0.0, 1.0, 2.0, 0.0], train_token_ind=2, domain="science", region="thinking",
                      raws=[b"A 40", b" " + omega[:1], omega[1:], b" <b>&"])
    assert example.text == "A 40 Ω <b>&"
    assert example.display_tokens() == ["A 40", " ", "Ω", " <b>&"]
    assert str(example) == "seq 3 pos 2 act 2 (science/thinking): A 40 [[Ω]] <b>&"
    page = example._repr_html_()
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    assert 'rgba(255,140,0,1.000)' in page and 'rgba(255,140,0,0.500)' in page and 'rgba(255,140,0,0.000)' in page
    outlined = [span for span in page.split("<span")[1:] if "outline" in span]
    assert len(outlined) == 1 and ">Ω</span>" in outlined[0]


def test_store_examples_read_as_the_tokenizer_decodes(tiny):
    store, tokenizer = tiny["store"], tiny["tokenizer"]
    layer, feature = _busiest(store)
    examples = store.feature(layer, feature).top_examples(10, before=5, after=5)
    assert examples and all(e.raws is not None and len(e.raws) == len(e.tokens) for e in examples)
    checked = 0
    for example in examples:
        expected = tokenizer.decode(example.token_ids)
        if "\ufffd" not in expected:  # a window cut mid-character decodes to U+FFFD; the text keeps \xNN there
            assert example.text == expected
            checked += 1
    assert checked
