"""Demo training on a tiny config: seeded and repeatable, saved in the original adapter format, loadable."""
from __future__ import annotations

import json

import torch

from featurestore.demo import TrainConfig, build_demo_checkpoint, training_metrics
from featurestore.demo.train_data import encode_docs, read_rows
from featurestore.demo.tokenizer import build_tokenizer
from featurestore.modeling import Qwen2ForCausalLMWithTranscoder, load_model

TINY = TrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, n_features=64, seq_len=32, batch_size=4, base_steps=3, reasoning_steps=3,
                   adapter_steps=4, resample_every=2, max_traces=30, eval_max_len=96)


def test_same_config_gives_same_weights_and_rng_is_left_alone(tmp_path):
    state = torch.random.get_rng_state()
    first = build_demo_checkpoint(tmp_path / "a", config=TINY, progress=False, use_cache=False)
    again = build_demo_checkpoint(tmp_path / "b", config=TINY, progress=False, use_cache=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    other = build_demo_checkpoint(tmp_path / "c", config=TrainConfig(**{**TINY.__dict__, "seed": 1}),
                                  progress=False, use_cache=False)
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_key_follows_the_training_config():
    assert TINY.key() == TrainConfig(**TINY.__dict__).key()
    assert TINY.key() != TrainConfig(**{**TINY.__dict__, "adapter_steps": 5}).key()
    assert TrainConfig().key() != TINY.key()


def test_checkpoint_is_in_the_original_format_and_loads(tmp_path):
    out = build_demo_checkpoint(tmp_path / "ckpt", config=TINY, progress=False, use_cache=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLMWithTranscoder"]
    assert (config["transcoder_n_features"], config["transcoder_dec_bias"]) == (64, False)
    net, info = load_model(str(out), device="cpu", dtype="float32")
    assert isinstance(net, Qwen2ForCausalLMWithTranscoder)
    assert (info.n_layers, info.n_features, info.d_model) == (2, 64, 32)
    dec = net.model.layers[1].mlp.transcoder_dec.weight
    assert torch.allclose(dec.norm(dim=0), torch.ones(64), atol=1e-4)  # unit decoder columns, as trained
    metrics = training_metrics(out)
    assert metrics["key"] == TINY.key() and len(metrics["l0_per_layer"]) == 2
    assert 0.0 <= metrics["base_thinking_accuracy"] <= 1.0 and metrics["kl_adapters_off"] > 0


def test_base_documents_drop_the_thinking_and_mask_marks_it():
    tokenizer = build_tokenizer()
    docs = encode_docs(tokenizer, read_rows(limit=20))
    think = tokenizer.convert_tokens_to_ids("<think>")
    end = tokenizer.convert_tokens_to_ids("</think>")
    complete = [d for d in docs if d.base is not None]
    assert complete and all(think not in d.base and end not in d.base for d in complete)
    for doc in complete:
        inside = [t for t, flag in zip(doc.full, doc.thinking) if flag]
        assert inside[-1] == end and think not in inside
        assert doc.full[-1] == tokenizer.eos_token_id and not doc.thinking[-1]
        assert len(doc.base) < len(doc.full)
