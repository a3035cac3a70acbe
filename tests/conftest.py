"""Shared fixtures: tiny tokenizers, models and datasets built at test time (no network, no binary assets)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]

WORDS = ("the so wait hmm therefore maybe compute sum of two numbers check again answer is code function return "
         "loop value atom energy force mass because let us try x y z = + - * / ( ) 1 2 3 4 5 6 7 8 9 0 é ü ∑ π").split()


def make_rows(n: int, seed: int = 0, incomplete_every: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        domain = ("math", "code", "science")[i % 3]
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        thought = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        response = f"<think>\n{thought}\n</think>\n\n{answer}" if i % incomplete_every != 3 else f"<think>\n{thought}"
        rows.append({"domain": domain, "source": f"synthetic-{domain}",
                     "conversations": [{"from": "user", "value": prompt}, {"from": "assistant", "value": response}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def build_tokenizer(out_dir: Path, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[1])
    fast.add_tokens(["<think>", "</think>"])
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, tokenizer, *, layers=3, d=32, d_mlp=64, n_features=48, dec_bias=True, seed=0,
                     enc_bias=-0.6) -> Path:
    from transformers import Qwen2Config

    from featurestore.modeling import Qwen2ForCausalLMWithTranscoder

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=d, intermediate_size=d_mlp, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, transcoder_n_features=n_features, transcoder_dec_bias=dec_bias,
                         architectures=["Qwen2ForCausalLMWithTranscoder"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLMWithTranscoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            layer.mlp.transcoder_enc.bias.fill_(enc_bias)
        model.model.norm.weight.fill_(1.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny adapter checkpoint, its dataset, and a store collected from them (shared, read-only)."""
    import featurestore as fs

    root = tmp_path_factory.mktemp("tiny")
    rows = make_rows(40)
    data = write_jsonl(root / "data.jsonl", rows)
    texts = [r["conversations"][0]["value"] + " " + r["conversations"][1]["value"] for r in rows]
    tokenizer = build_tokenizer(root / "tok", texts)
    model_dir = build_tiny_model(root / "model", tokenizer)
    store = fs.collect(str(model_dir), str(data), root / "store", chunk_size=8, batch_tokens=512, progress=False)
    return {"root": root, "data": data, "model": model_dir, "tokenizer": tokenizer, "store_path": root / "store",
            "store": store, "rows": rows}
