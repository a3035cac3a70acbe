"""RelP attribution on tiny seeded models: forward values, conservation, edges vs a slow reference, ordering."""
from __future__ import annotations

import pytest
import torch

from attribution import attribute
from attribution.architectures import architecture_for
from attribution.engine import RowComputer, find_active_features, partial_influences
from attribution.linearised import linearised_forward
from attribution.prompts import encode_prompt
from attribution.reference import reference_rows
from featurestore.errors import UserError
from test_attribution_support import build_checkpoint, load, prompt_text

INJECTIONS = ["encoder-input", "layer-input"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: thread start-up costs more than the work (and the test machine is shared)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    return load(build_checkpoint(tmp_path_factory.mktemp("biased"), seed=1))


@pytest.fixture(scope="module")
def unbiased(tmp_path_factory):
    return load(build_checkpoint(tmp_path_factory.mktemp("unbiased"), seed=2, zero_biases=True))


def hf_reference_values(model, ids):
    """Logits, layer inputs and adapter-encoder inputs from the plain Hugging Face forward."""
    encoder_inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: encoder_inputs.__setitem__(i, args[0][0]))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    layer_inputs = [h[0] for h in out.hidden_states[:-1]]
    return out.logits[0, -1], layer_inputs, [encoder_inputs[i] for i in range(len(layer_inputs))]


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_linearised_forward_keeps_the_model_values(tmp_path, sliding_window):
    model, tokenizer = load(build_checkpoint(tmp_path / "m", seed=3, sliding_window=sliding_window))
    ids, _ = encode_prompt(tokenizer, prompt_text(9))
    logits, _, encoder_inputs = hf_reference_values(model, ids)
    trace = linearised_forward(architecture_for(model), torch.tensor(ids))
    torch.testing.assert_close(trace.last_logits, logits, rtol=1e-4, atol=1e-4)
    for layer, x in enumerate(encoder_inputs):
        expected = torch.relu(model.model.layers[layer].mlp.transcoder_enc(x))
        torch.testing.assert_close(trace.activations[layer], expected, rtol=1e-4, atol=1e-5)
    assert 0 < sum(int((a > 0).sum()) for a in trace.activations) < 0.6 * 3 * len(ids) * 40  # sparse, not empty


@pytest.mark.parametrize("injection", INJECTIONS)
def test_incoming_edges_sum_to_the_target_value_without_biases(unbiased, injection):
    model, tokenizer = unbiased
    ids, _ = encode_prompt(tokenizer, prompt_text(8))
    graph = attribute(model, tokenizer, ids, injection=injection, exclude_bos=False, max_feature_nodes=10**6,
                      batch_size=5, max_n_logits=4, desired_logit_prob=0.99)
    assert graph.n_selected == graph.info["n_active"] > 20  # every active feature has a row, BOS ones included
    logits, layer_inputs, encoder_inputs = hf_reference_values(model, ids)
    reads = encoder_inputs if injection == "encoder-input" else layer_inputs
    expected = [float(model.model.layers[l].mlp.transcoder_enc.weight[f] @ reads[l][p])
                for l, p, f in graph.feature_nodes().tolist()]
    expected += [0.0] * graph.n_pos
    expected += (logits[graph.logit_tokens] - logits.mean()).tolist()
    expected = torch.tensor(expected)
    sums = graph.adjacency.double().sum(1).float()
    torch.testing.assert_close(sums, expected, rtol=1e-4, atol=2e-4)
    assert expected[: graph.n_selected].abs().max() > 0.1  # the check is not vacuous


def test_encoder_input_feature_value_is_the_pre_activation_without_bias(unbiased):
    """The encoder-input target of a feature is its real pre-activation minus b_enc (an activation > 0 here)."""
    model, tokenizer = unbiased
    ids, _ = encode_prompt(tokenizer, prompt_text(8))
    graph = attribute(model, tokenizer, ids, exclude_bos=False, max_feature_nodes=10**6, max_n_logits=1)
    bias = torch.stack([layer.mlp.transcoder_enc.bias for layer in model.model.layers])
    layers, _, features = graph.feature_nodes().T
    activations = graph.activation_values[graph.selected_features]
    torch.testing.assert_close(graph.adjacency[: graph.n_selected].sum(1) + bias[layers, features], activations,
                               rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_every_edge_equals_a_single_target_backward(biased, injection):
    model, tokenizer = biased
    arch = architecture_for(model)
    ids, _ = encode_prompt(tokenizer, prompt_text(7))
    with torch.no_grad():
        trace = linearised_forward(arch, torch.tensor(ids), record=True)
        active = find_active_features(trace)
        computer = RowComputer(arch, trace, active, injection, chunk_elements=64)  # forces several gather chunks
        picks = torch.randperm(len(active), generator=torch.Generator().manual_seed(0))[:11]
        sites = torch.cat([active.layers[picks], torch.tensor([arch.n_layers, arch.n_layers])])
        positions = torch.cat([active.positions[picks], torch.tensor([len(ids) - 1] * 2)])
        vectors = torch.cat([torch.stack([arch.encoder(int(l)).weight[int(f)] for l, f in
                                          zip(active.layers[picks], active.features[picks])]),
                             arch.unembed[[5, 9]] - arch.unembed.mean(0)]).float()
        ours = torch.cat([computer(sites[i:i + 4], positions[i:i + 4], vectors[i:i + 4]) for i in range(0, 13, 4)])
    targets = list(zip(sites.tolist(), positions.tolist(), vectors))
    single, reference_active = reference_rows(model, ids, targets, injection=injection, batch_size=1)
    replicated, _ = reference_rows(model, ids, targets, injection=injection, batch_size=5)
    assert torch.equal(reference_active.features, active.features)
    torch.testing.assert_close(ours, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(replicated, single, rtol=1e-5, atol=1e-6)
    assert (single[:, : len(active)] != 0).sum() > 50


def test_graph_rows_match_the_reference_and_ignore_batching_and_budget(biased):
    model, tokenizer = biased
    text = prompt_text(7, offset=11)
    full = attribute(model, tokenizer, text, max_feature_nodes=10**6, batch_size=1)
    assert full.n_selected == full.info["n_active"]
    for batch_size, budget in ((7, 10**6), (3, 9), (16, 9)):
        part = attribute(model, tokenizer, text, max_feature_nodes=budget, batch_size=batch_size)
        assert part.n_selected == min(budget, full.n_selected)
        assert torch.equal(part.logit_tokens, full.logit_tokens)
        # map the part graph's nodes into the full graph's node order and compare the common block
        position = {int(s): i for i, s in enumerate(full.selected_features)}
        tail = torch.arange(full.n_selected, full.n_selected + full.n_pos + full.n_logits)
        nodes = torch.cat([torch.tensor([position[int(s)] for s in part.selected_features], dtype=torch.long), tail])
        torch.testing.assert_close(part.adjacency, full.adjacency[nodes[:, None], nodes[None, :]], rtol=1e-5, atol=1e-6)
    # and rows of the full graph against the slow reference, column for column
    ids = full.input_tokens.tolist()
    arch = architecture_for(model)
    sample = torch.randperm(full.n_selected, generator=torch.Generator().manual_seed(1))[:12].sort().values
    targets = [(l, p, arch.encoder(l).weight[f]) for l, p, f in full.feature_nodes()[sample].tolist()]
    targets += [(arch.n_layers, len(ids) - 1, arch.unembed[t] - arch.unembed.mean(0)) for t in full.logit_tokens.tolist()]
    rows, _ = reference_rows(model, ids, targets, batch_size=1, first_position=1)
    columns = torch.cat([full.selected_features, full.info["n_active"] + torch.arange(len(ids))])
    expected = rows[:, columns]
    expected[:, full.n_selected] = 0.0  # the BOS token's out-edges are excluded
    ours = torch.cat([full.adjacency[sample], full.adjacency[-full.n_logits:]])[:, : full.n_selected + len(ids)]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_budget_picks_the_most_influential_features_first(biased):
    model, tokenizer = biased
    text = prompt_text(7, offset=11)
    full = attribute(model, tokenizer, text, max_feature_nodes=10**6)
    # direct influence on the logits alone ranks the first batch exactly
    part = attribute(model, tokenizer, text, max_feature_nodes=4, batch_size=4, update_interval=1)
    logit_rows = full.adjacency[-full.n_logits:, : full.n_selected].abs()
    logit_rows = logit_rows / full.adjacency[-full.n_logits:].abs().sum(1, keepdim=True)
    direct = full.logit_probabilities @ logit_rows
    best = set(full.selected_features[torch.topk(direct, 4).indices].tolist())
    assert set(part.selected_features.tolist()) == best


def test_partial_influences_equal_the_power_series():
    generator = torch.Generator().manual_seed(0)
    n_nodes, n_logits = 9, 2
    rows = torch.randn(5, n_nodes, generator=generator)  # rows for nodes 7, 8 (logits) and 0, 2, 4
    row_nodes = torch.tensor([7, 8, 0, 2, 4])
    rows[:, 5:] = 0
    rows[2] = 0  # node 0 is a leaf (a first-layer feature)
    rows[3, [2, 4]] = 0  # node 2 reads only nodes 0, 1, 3
    rows[4, [2, 4]] = 0
    rows[3, 0] = rows[4, 0] = 0
    probs = torch.tensor([0.7, 0.2])
    dense = torch.zeros(n_nodes, n_nodes)
    dense[row_nodes] = rows.abs() / rows.abs().sum(1, keepdim=True).clamp(min=1e-8)
    weights = torch.zeros(n_nodes)
    weights[-n_logits:] = probs
    expected = weights @ (torch.linalg.inv(torch.eye(n_nodes) - dense) - torch.eye(n_nodes))
    torch.testing.assert_close(partial_influences(rows, row_nodes, probs), expected)


def test_target_bos_and_frozen_parameters(biased):
    model, tokenizer = biased
    ids, has_bos = encode_prompt(tokenizer, prompt_text(6))
    assert has_bos and ids[0] == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    unlikely = int(logits.argmin())
    for param in model.parameters():
        param.requires_grad_(True)
    try:
        with torch.no_grad():  # attribution turns gradients on for itself
            graph = attribute(model, tokenizer, ids, target=unlikely, max_n_logits=3)
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        for param in model.parameters():
            param.requires_grad_(False)
    assert graph.logit_tokens[-1] == unlikely and graph.n_logits == 4
    assert graph.target_logit_index == 3 and graph.info["target_rank"] == 64
    torch.testing.assert_close(graph.logit_probabilities[-1], torch.softmax(logits, -1)[unlikely])
    assert graph.top_token == int(logits.argmax())
    assert not graph.adjacency.requires_grad and graph.adjacency.dtype == torch.float32
    assert graph.bos_excluded and (graph.feature_nodes()[:, 1] > 0).all()
    assert (graph.adjacency[:, graph.n_selected] == 0).all()  # the BOS token has no out-edges
    assert graph.adjacency[:, graph.n_selected + 1].abs().sum() > 0
    kinds = [node["kind"] for node in graph.nodes()]
    assert len(kinds) == graph.adjacency.shape[0] and kinds[graph.n_selected] == "embedding" and kinds[-1] == "logit"


def test_bad_arguments_are_user_errors(biased):
    model, tokenizer = biased
    with pytest.raises(UserError, match=r"max_feature_nodes \(--max-feature-nodes\) must be at least 1"):
        attribute(model, tokenizer, prompt_text(4), max_feature_nodes=0)
    with pytest.raises(UserError, match="injection"):
        attribute(model, tokenizer, prompt_text(4), injection="residual")
    with pytest.raises(UserError, match="empty"):
        attribute(model, tokenizer, "")
    with pytest.raises(UserError, match="outside the vocabulary"):
        attribute(model, tokenizer, prompt_text(4), target=10**6)
