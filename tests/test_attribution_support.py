"""Tiny seeded Qwen2 + transcoder-adapter checkpoints and a word-level tokenizer for the attribution tests."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from featurestore.modeling import Qwen2ForCausalLMWithTranscoder, load_model, load_tokenizer

BOS = "<bos>"
WORDS = [f"w{i}" for i in range(56)]


def save_tokenizer(directory: Path) -> None:
    vocab = {word: i for i, word in enumerate(WORDS)}
    vocab[BOS] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, unk_token="<unk>")
    fast.save_pretrained(str(directory))


def tiny_config(*, dec_bias: bool = True, adapters: bool = True, sliding_window: int | None = None, **extra) -> Qwen2Config:
    options = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if adapters:
        options.update(transcoder_n_features=40, transcoder_dec_bias=dec_bias,
                       architectures=["Qwen2ForCausalLMWithTranscoder"])
    if sliding_window:
        options.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    options.update(extra)
    return Qwen2Config(**options)


def randomise(model: torch.nn.Module, seed: int, zero_biases: bool) -> None:
    """Weights large enough that attention, norms and MLPs all matter; sparse features via a negative b_enc."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif name.endswith("transcoder_enc.bias"):
                param.copy_(-0.6 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(torch.zeros_like(param) if zero_biases else 0.2 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def build_checkpoint(directory: Path, *, seed: int = 0, zero_biases: bool = False, **config_options) -> Path:
    config = tiny_config(**config_options)
    model_cls = Qwen2ForCausalLMWithTranscoder if config_options.get("adapters", True) else Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config)
    randomise(model, seed, zero_biases)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


def load(directory: Path):
    model, _ = load_model(str(directory), dtype="float32", device="cpu")
    return model, load_tokenizer(directory)


def prompt_text(n: int, offset: int = 3) -> str:
    return " ".join(WORDS[(offset + 7 * i) % len(WORDS)] for i in range(n))
