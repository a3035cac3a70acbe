"""The demo model: a small Qwen2 causal LM with transcoder adapters, its weights generated in code.

Base weights are seeded Gaussians. The adapters are built to look like trained ones: each layer's 1024
features mix token features (they fire on one frequent token and promote the token that most often follows
it), group features (digits, hedges such as "Wait"/"Hmm", connectors, operators, code-, math- or
science-heavy tokens) and unlabelled random directions, with a few dead features. Encoder directions and
biases are calibrated on a slice of the bundled traces, layer by layer in one forward pass, so that each
feature fires on a chosen fraction of tokens and about 6-11 features are active per token per layer.
Everything is deterministic for a given seed; values are rounded so tiny float differences between
machines do not change the saved bytes.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config

from ..modeling import Qwen2ForCausalLMWithTranscoder
from .tokenizer import ASSISTANT, USER, build_tokenizer, traces_path

ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
N_FEATURES = 1024
N_TOKEN_FEATURES, N_GROUP_FEATURES, N_DEAD_FEATURES = 320, 128, 12
TARGET_DENSITY = (6.0, 7.5, 9.0, 10.5)  # mean active features per token, by layer
CALIBRATION_STRIDE = 7  # every 7th trace (50 traces, ~12k tokens) calibrates the adapters
CALIBRATION_MAX_TOKENS = 512  # cut the few longest ones, so padding does not dominate the calibration pass
_HEDGES = {"Wait", "Hmm", "Hold", "Actually", "maybe", "mistake", "wrong", "check", "verify", "sure", "redo",
           "think", "wonder", "seems", "off", "forgot"}
_CONNECTORS = {"So", "so", "Therefore", "therefore", "Then", "then", "Thus", "thus", "Now", "Next", "because",
               "since", "First", "Okay", "Alright"}
_OPERATORS = {"+", "-", "×", "=", "/", "^", "(", ")", "*", "±", "≡", "·", "²", "√"}


def demo_config(vocab_size: int, bos_id: int, eos_id: int) -> Qwen2Config:
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=32768, rope_theta=10000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                         bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                         transcoder_n_features=N_FEATURES, transcoder_dec_bias=False, **ARCH)
    config.architectures = ["Qwen2ForCausalLMWithTranscoder"]
    return config


def _quantize(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t * 1e4) / 1e4


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def calibration_sequences(tokenizer: PreTrainedTokenizerFast) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """All traces in deepseek format (for token statistics), the calibration slice, and each trace's domain."""
    encoded, domains = [], []
    with open(traces_path(), encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            turns = row["conversations"]
            encoded.append(tokenizer.encode(USER + turns[0]["value"] + ASSISTANT + turns[1]["value"]))
            domains.append(row["domain"])
    return encoded, [ids[:CALIBRATION_MAX_TOKENS] for ids in encoded[::CALIBRATION_STRIDE]], domains


class _Plan:
    """Token statistics that decide which tokens and groups get features and what each feature promotes."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, sequences: list[list[int]], domains: list[str]):
        self.unigram: Counter = Counter()
        self.by_domain: dict[str, Counter] = {}
        self.bigram: dict[int, Counter] = {}
        for ids, domain in zip(sequences, domains):
            self.unigram.update(ids)
            self.by_domain.setdefault(domain, Counter()).update(ids)
            for a, b in zip(ids, ids[1:]):
                self.bigram.setdefault(a, Counter())[b] += 1
        texts = {i: tokenizer.decode([i]).strip() for i in self.unigram}
        frequent = [i for i, c in sorted(self.unigram.items(), key=lambda kv: (-kv[1], kv[0])) if c >= 5]
        self.frequent = frequent
        self.groups: dict[str, list[int]] = {
            "digits": [i for i in frequent if texts[i].isdigit() and len(texts[i]) == 1],
            "hedges": [i for i in frequent if texts[i].strip(",.") in _HEDGES],
            "connectors": [i for i in frequent if texts[i].strip(",.") in _CONNECTORS],
            "operators": [i for i in frequent if texts[i] in _OPERATORS],
            "punctuation": [i for i in frequent if texts[i] in {".", ",", ":", "?", "!", ".\n", ".\n\n"}],
            "newlines": [i for i in frequent if "\n" in tokenizer.decode([i])],
            "capitalized": [i for i in frequent if texts[i][:1].isupper() and texts[i].isalpha()],
        }
        for domain, counts in sorted(self.by_domain.items()):
            self.groups[domain] = [i for i in frequent if counts[i] >= 0.85 * self.unigram[i]]
        self.groups = {name: ids for name, ids in self.groups.items() if len(ids) >= 2}

    def next_token(self, ids: list[int]) -> int:
        follow = Counter()
        for i in ids:
            follow.update(self.bigram.get(i, Counter()))
        return min(follow.items(), key=lambda kv: (-kv[1], kv[0]))[0] if follow else ids[0]


def _base_weights(model: Qwen2ForCausalLMWithTranscoder, gen: torch.Generator) -> None:
    """Seeded Gaussians for every base parameter; norms at one. Adapters are filled in by calibration."""
    d, d_mlp = model.config.hidden_size, model.config.intermediate_size
    scales = {"q_proj.weight": d ** -0.5, "k_proj.weight": d ** -0.5, "v_proj.weight": d ** -0.5,
              "o_proj.weight": 0.5 * d ** -0.5, "gate_proj.weight": d ** -0.5, "up_proj.weight": d ** -0.5,
              "down_proj.weight": 0.5 * d_mlp ** -0.5, "q_proj.bias": 0.1, "k_proj.bias": 0.1, "v_proj.bias": 0.1,
              "embed_tokens.weight": 1.0, "lm_head.weight": d ** -0.5}
    for name, param in model.named_parameters():
        if "transcoder_" in name:
            continue
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        key = next((k for k in scales if name.endswith(k)), None)
        if key is None:
            raise RuntimeError(f"demo model: no initialisation rule for {name}")
        param.data.copy_(_quantize(torch.randn(param.shape, generator=gen) * scales[key]))


class _Calibrator:
    """A forward pre-hook per adapter: sets that layer's adapter from its real inputs before it runs."""

    def __init__(self, model, plan: _Plan, gen: torch.Generator, token_mask: torch.Tensor, token_ids: torch.Tensor):
        self.model, self.plan, self.gen = model, plan, gen
        self.mask, self.ids = token_mask, token_ids  # (B, T) bool, (B, T) long
        self.lm_head = _unit(model.lm_head.weight.detach())

    def __call__(self, module, args):
        x = args[0][self.mask].float()  # (N, d): the MLP inputs at real (non-pad) positions
        ids = self.ids[self.mask]
        layer = module.layer_idx
        directions, rates, gains, promotes = self._features(x, ids, layer)
        order = torch.randperm(N_FEATURES, generator=self.gen)  # feature index says nothing about its kind
        directions, rates, gains, promotes = directions[order], rates[order], gains[order], promotes[order]
        enc = _quantize(gains[:, None] * directions)
        pre = enc @ x.T  # (F, N): each feature's pre-activation at every calibration token
        k = (rates * len(x)).round().long().clamp(1, len(x) - 1)
        top = torch.topk(pre, int(k.max()) + 1, dim=1).values  # (F, kmax+1), descending
        rows = torch.arange(N_FEATURES)
        threshold = (top[rows, k - 1] + top[rows, k]) / 2
        bias = -threshold
        bias[rates == 0] = -1e3  # dead features
        dec = torch.randn(N_FEATURES, x.shape[1], generator=self.gen)
        dec = _unit(torch.where(promotes[:, None] >= 0, self.lm_head[promotes.clamp_min(0)], dec))
        module.transcoder_enc.weight.data.copy_(enc)
        module.transcoder_enc.bias.data.copy_(_quantize(bias))
        module.transcoder_dec.weight.data.copy_(_quantize(0.5 * dec.T))

    def _features(self, x: torch.Tensor, ids: torch.Tensor, layer: int):
        plan, gen, d = self.plan, self.gen, x.shape[1]
        centre = x.mean(0)
        vocab = self.model.config.vocab_size
        sums = torch.zeros(vocab, d).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=vocab).float()
        present = [i for i in plan.frequent if counts[i] >= 2]
        picks = torch.randperm(len(present), generator=gen)[:N_TOKEN_FEATURES].sort().values
        tokens = [present[i] for i in picks]
        group_names = sorted(plan.groups)
        groups = []
        for _ in range(N_GROUP_FEATURES):
            members = plan.groups[group_names[int(torch.randint(len(group_names), (1,), generator=gen))]]
            size = min(len(members), int(torch.randint(2, 9, (1,), generator=gen)))
            chosen = [members[i] for i in torch.randperm(len(members), generator=gen)[:size].sort().values]
            groups.append([i for i in chosen if counts[i] > 0] or chosen[:1])
        dirs, rates, promotes = [], [], []
        for tok in tokens:
            dirs.append(sums[tok] / counts[tok] - centre)
            rates.append(float(counts[tok]) / len(x))
            promotes.append(plan.next_token([tok]))
        for members in groups:
            idx = torch.tensor(members)
            total = counts[idx].sum().clamp_min(1)
            dirs.append(sums[idx].sum(0) / total - centre)
            rates.append(min(0.05, 0.8 * float(total) / len(x)))
            promotes.append(plan.next_token(members))
        n_random = N_FEATURES - len(tokens) - len(groups)
        dirs.append(torch.randn(n_random, d, generator=gen))
        log_rates = torch.empty(n_random).uniform_(0, 1, generator=gen) * 4.6 - 7.6  # e^-7.6 .. e^-3
        random_rates = log_rates.exp()
        budget = max(1.0, TARGET_DENSITY[layer] - sum(rates))
        random_rates = (random_rates * budget / random_rates[N_DEAD_FEATURES:].sum()).clamp(max=0.08)
        random_rates[:N_DEAD_FEATURES] = 0.0
        directions = torch.cat([torch.stack(dirs[: len(tokens) + len(groups)]), dirs[-1]])
        gains = torch.cat([torch.full((len(tokens) + len(groups),), 1.0), torch.full((n_random,), 2.0)])
        rates_t = torch.cat([torch.tensor(rates), random_rates])
        promotes_t = torch.tensor(promotes + [-1] * n_random)
        return _unit(directions), rates_t, gains, promotes_t


def _calibrate(model, tokenizer: PreTrainedTokenizerFast, plan: _Plan, batch: list[list[int]],
               gen: torch.Generator) -> None:
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    calibrator = _Calibrator(model, plan, gen, mask, ids)
    handles = [adapter.register_forward_pre_hook(calibrator) for adapter in model.adapters()]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()


def build_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the demo checkpoint (weights + tokenizer) into ``out_dir`` and return it.

    The result is a normal checkpoint directory for ``featurestore.modeling.load_model``.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer(out)
    sequences, calibration, domains = calibration_sequences(tokenizer)
    plan = _Plan(tokenizer, sequences, domains)
    config = demo_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global RNG; leave it untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLMWithTranscoder(config).eval()
    _base_weights(model, gen)
    _calibrate(model, tokenizer, plan, calibration, gen)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
