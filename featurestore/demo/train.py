"""Train the demo's miniature of the paper on CPU: a base LM, its reasoning fine-tune, adapters between them.

1. **base**: a small Qwen2 trained from scratch on prompts and answers with the thinking removed;
2. **reasoning**: the base fine-tuned on whole traces, ``<think>`` ... ``</think>`` included;
3. **adapters**: the reasoning model with each MLP replaced by the frozen base MLP plus
   ``dec(relu(enc(x)))``; only the adapters train, on KL to the reasoning model's next-token distribution,
   plus NMSE of each layer's MLP difference (reasoning MLP - base MLP, on the reasoning model's MLP inputs)
   and an L1 penalty on feature activations (times decoder norms) whose weight is steered to a target L0.

The result is saved in the original checkpoint format (a Qwen2 config with ``transcoder_n_features``,
weights ``model.layers.{i}.mlp.transcoder_enc/dec``). Everything is seeded: the same config gives the same
weights on the same machine and thread count.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from ..modeling import Qwen2ForCausalLMWithTranscoder
from . import train_data
from .tokenizer import build_tokenizer

METRICS_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    n_features: int = 512
    seq_len: int = 128
    batch_size: int = 8
    base_steps: int = 200
    reasoning_steps: int = 300
    adapter_steps: int = 300
    lm_lr: float = 3e-3
    finetune_lr: float = 1e-3
    adapter_lr: float = 1e-3
    resample_every: int = 50  # features silent for this many steps are re-initialised (until 70% of training)
    nmse_weight: float = 1.0
    target_l0: float = 8.0  # the L1 weight is steered so that the mean L0 per layer approaches this
    heldout_every: int = 10  # every 10th trace is held out for the printed metrics
    max_traces: int | None = None  # a prefix of the traces (tests train on a few)
    eval_max_len: int = 1024
    threads: int = 1  # fixed, so builds repeat exactly; one thread also degrades gracefully on a busy machine
    seed: int = 0

    def key(self) -> str:
        """Identifies a build: this config, the training code and the traces it reads."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        here = Path(__file__).parent
        for name in ("train.py", "train_data.py", "tokenizer.py", "traces.jsonl"):
            digest.update((here / name).read_bytes())
        return digest.hexdigest()[:16]


def model_config(cfg: TrainConfig, tokenizer, adapters: bool) -> Qwen2Config:
    extra = dict(transcoder_n_features=cfg.n_features, transcoder_dec_bias=False) if adapters else {}
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, use_sliding_window=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **extra)
    config.architectures = ["Qwen2ForCausalLMWithTranscoder" if adapters else "Qwen2ForCausalLM"]
    return config


def _lr_scale(step: int, total: int) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not progress, leave=True, dynamic_ncols=True)


def train_lm(model, tokens: torch.Tensor, steps: int, lr: float, cfg: TrainConfig, gen: torch.Generator,
             desc: str, progress: bool) -> float:
    """Next-token training on windows of the stream; returns the mean loss of the last tenth of the steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    losses = []
    with _bar(steps, desc, progress) as bar:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * _lr_scale(step, steps)
            batch = train_data.windows(tokens, cfg.batch_size, cfg.seq_len, gen)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


def hybrid_from(reasoning: Qwen2ForCausalLM, base: Qwen2ForCausalLM, config: Qwen2Config):
    """The reasoning model with each MLP swapped for the base MLP plus a fresh adapter (the only trainables)."""
    hybrid = Qwen2ForCausalLMWithTranscoder(config)
    hybrid.load_state_dict(reasoning.state_dict(), strict=False)
    for mine, theirs in zip(hybrid.adapters(), base.model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mine, name).load_state_dict(getattr(theirs.mlp, name).state_dict())
    for name, param in hybrid.named_parameters():
        param.requires_grad_("transcoder_" in name)
    with torch.no_grad():
        for adapter in hybrid.adapters():
            enc = torch.randn_like(adapter.transcoder_enc.weight) / math.sqrt(config.hidden_size)
            adapter.transcoder_enc.weight.copy_(0.05 * enc)  # small acts at first: the adapter starts near zero
            adapter.transcoder_enc.bias.fill_(-0.02)
            adapter.transcoder_dec.weight.copy_(F.normalize(enc.T, dim=0))
    return hybrid


def _capture_mlp_io(model) -> tuple[list, list]:
    """Forward hooks that keep each MLP's input and output of the latest forward pass."""
    io: list = [None] * len(model.model.layers)

    def hook(index):
        return lambda module, args, output: io.__setitem__(index, (args[0], output))

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    return io, handles


def _collect_features(hybrid) -> list:
    acts: list = [None] * len(hybrid.adapters())
    for adapter in hybrid.adapters():
        adapter.feature_hook = acts.__setitem__
    return acts


def _release(hybrid) -> None:
    for adapter in hybrid.adapters():
        adapter.feature_hook = None


def kl_to(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, in nats."""
    p_log = F.log_softmax(p_logits.float(), -1)
    return (p_log.exp() * (p_log - F.log_softmax(q_logits.float(), -1))).sum(-1)


def train_adapters(hybrid, reasoning, tokens: torch.Tensor, cfg: TrainConfig, gen: torch.Generator,
                   progress: bool) -> dict:
    params = [p for p in hybrid.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.adapter_lr, betas=(0.9, 0.98), weight_decay=0.0)
    io, handles = _capture_mlp_io(reasoning)
    acts = _collect_features(hybrid)
    l1_weight, last = 1e-3, {}
    silent = [torch.ones(cfg.n_features, dtype=torch.bool) for _ in acts]
    hybrid.train()
    try:
        with _bar(cfg.adapter_steps, "training adapters (KL + NMSE + L1)", progress) as bar:
            for step in range(cfg.adapter_steps):
                for group in opt.param_groups:
                    group["lr"] = cfg.adapter_lr * _lr_scale(step, cfg.adapter_steps)
                batch = train_data.windows(tokens, cfg.batch_size, cfg.seq_len, gen)[:, :-1]
                with torch.no_grad():
                    target = reasoning(input_ids=batch, use_cache=False).logits
                logits = hybrid(input_ids=batch, use_cache=False).logits
                kl = kl_to(target, logits).mean()
                nmse, l1, l0 = 0.0, 0.0, 0.0
                for adapter, (x, y), a in zip(hybrid.adapters(), io, acts):
                    with torch.no_grad():
                        diff = y - Qwen2MLP.forward(adapter, x)
                    delta = adapter.transcoder_dec(adapter.encode(x))
                    nmse = nmse + ((delta - diff) ** 2).sum() / (diff ** 2).sum().clamp_min(1e-8)
                    l1 = l1 + a.sum(-1).mean()  # decoder columns are kept at unit norm, so this is the L1 of acts
                    l0 += (a.detach() > 0).sum(-1).float().mean().item()
                n_layers = len(acts)
                nmse, l0 = nmse / n_layers, l0 / n_layers
                loss = kl + cfg.nmse_weight * nmse + l1_weight * l1 / n_layers
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                with torch.no_grad():
                    for adapter in hybrid.adapters():
                        adapter.transcoder_dec.weight.copy_(F.normalize(adapter.transcoder_dec.weight, dim=0))
                # steer the L1 weight towards the target L0: up while too dense, down while too sparse
                l1_weight *= math.exp(0.1 * math.tanh(math.log(max(l0, 1e-3) / cfg.target_l0)))
                l1_weight = min(max(l1_weight, 1e-5), 1.0)
                for layer, a in enumerate(acts):
                    silent[layer] &= ~(a.detach() > 0).flatten(0, -2).any(0)
                if (step + 1) % cfg.resample_every == 0:
                    if step < 0.7 * cfg.adapter_steps:
                        for adapter, (x, _), dead in zip(hybrid.adapters(), io, silent):
                            _resample(adapter, x.flatten(0, -2), dead, gen)
                    silent = [torch.ones(cfg.n_features, dtype=torch.bool) for _ in acts]
                last = dict(kl=kl.item(), nmse=float(nmse.detach()), l0=l0, l1_weight=l1_weight)
                bar.set_postfix(kl=f"{last['kl']:.3f}", nmse=f"{last['nmse']:.2f}", L0=f"{l0:.1f}")
                bar.update()
    finally:
        for handle in handles:
            handle.remove()
        _release(hybrid)
        hybrid.eval()
    return last


@torch.no_grad()
def _resample(adapter, x: torch.Tensor, dead: torch.Tensor, gen: torch.Generator) -> None:
    """Point each dead feature at a random token's centred MLP input, firing on about the top 1% like it."""
    n = int(dead.sum())
    if n == 0:
        return
    rows = dead.nonzero().squeeze(1)
    centred = x - x.mean(0)
    picks = torch.randint(0, len(x), (n,), generator=gen)
    # a small encoder norm: the new feature starts with small acts and must earn its weight
    enc = 0.2 * F.normalize(centred[picks], dim=-1) * adapter.transcoder_enc.weight.norm(dim=-1).mean()
    pre = x @ enc.T  # (N, n)
    adapter.transcoder_enc.weight[rows] = enc
    adapter.transcoder_enc.bias[rows] = -torch.quantile(pre, 0.99, dim=0)
    adapter.transcoder_dec.weight[:, rows] = F.normalize(torch.randn(x.shape[1], n, generator=gen), dim=0)


@torch.no_grad()
def evaluate(base, reasoning, hybrid, heldout: list, pad_id: int, cfg: TrainConfig) -> dict:
    """Held-out metrics: thinking-token accuracy, KL to the reasoning model with adapters off and on, L0, dead."""
    n_layers, n_features = len(hybrid.adapters()), cfg.n_features
    sums = dict(base_hits=0, reasoning_hits=0, thinking=0, kl_off=0.0, kl_on=0.0, positions=0)
    active = torch.zeros(n_layers)
    ever = torch.zeros(n_layers, n_features, dtype=torch.bool)
    acts = _collect_features(hybrid)
    try:
        for start in range(0, len(heldout), 8):
            ids, mask, thinking = train_data.padded(heldout[start:start + 8], pad_id, cfg.eval_max_len)
            target = thinking[:, 1:] & mask[:, 1:]
            reasoning_logits = reasoning(input_ids=ids, attention_mask=mask.long()).logits
            base_logits = base(input_ids=ids, attention_mask=mask.long()).logits
            for key, logits in (("base_hits", base_logits), ("reasoning_hits", reasoning_logits)):
                sums[key] += int(((logits[:, :-1].argmax(-1) == ids[:, 1:]) & target).sum())
            sums["thinking"] += int(target.sum())
            on = hybrid(input_ids=ids, attention_mask=mask.long()).logits
            for layer, a in enumerate(acts):
                fired = a[mask] > 0
                active[layer] += fired.sum()
                ever[layer] |= fired.any(0)
            sums["kl_on"] += float(kl_to(reasoning_logits, on)[mask].sum())
            with _adapters_off(hybrid):
                off = hybrid(input_ids=ids, attention_mask=mask.long()).logits
            sums["kl_off"] += float(kl_to(reasoning_logits, off)[mask].sum())
            sums["positions"] += int(mask.sum())
    finally:
        _release(hybrid)
    kl_off, kl_on = sums["kl_off"] / sums["positions"], sums["kl_on"] / sums["positions"]
    return {
        "heldout_traces": len(heldout),
        "heldout_thinking_tokens": sums["thinking"],
        "base_thinking_accuracy": sums["base_hits"] / max(1, sums["thinking"]),
        "reasoning_thinking_accuracy": sums["reasoning_hits"] / max(1, sums["thinking"]),
        "kl_adapters_off": kl_off,
        "kl_adapters_on": kl_on,
        "kl_gap_recovered": 1 - kl_on / kl_off if kl_off > 0 else 0.0,
        "l0_per_layer": (active / sums["positions"]).tolist(),
        "dead_features_per_layer": (~ever).sum(1).tolist(),
    }


class _adapters_off:
    """Zero the adapters' decoders for a forward pass: the reasoning model with base MLPs alone."""

    def __init__(self, hybrid):
        self.decs = [a.transcoder_dec.weight for a in hybrid.adapters()]

    def __enter__(self):
        self.saved = [w.detach().clone() for w in self.decs]
        for w in self.decs:
            w.data.zero_()

    def __exit__(self, *exc):
        for w, saved in zip(self.decs, self.saved):
            w.data.copy_(saved)


def train_demo(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), progress: bool = True) -> dict:
    """Train all three stages and save the adapter checkpoint (+ tokenizer, + ``training.json``) to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(out)
    docs = train_data.encode_docs(tokenizer, train_data.read_rows(limit=cfg.max_traces))
    train, heldout = train_data.split(docs, cfg.heldout_every)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        with torch.random.fork_rng(devices=[]):  # model init draws from the global RNG; leave the caller's alone
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            base = Qwen2ForCausalLM(model_config(cfg, tokenizer, adapters=False))
            base_stream = train_data.stream([d.base for d in train if d.base], gen)
            base_loss = train_lm(base, base_stream, cfg.base_steps, cfg.lm_lr, cfg, gen,
                                 "training base model (no thinking)", progress)
            reasoning = Qwen2ForCausalLM(base.config)
            reasoning.load_state_dict(base.state_dict())
            full_stream = train_data.stream([d.full for d in train], gen)
            reasoning_loss = train_lm(reasoning, full_stream, cfg.reasoning_steps, cfg.finetune_lr, cfg, gen,
                                      "fine-tuning reasoning model", progress)
            for param in reasoning.parameters():
                param.requires_grad_(False)
            hybrid = hybrid_from(reasoning, base, model_config(cfg, tokenizer, adapters=True))
            final = train_adapters(hybrid, reasoning, full_stream, cfg, gen, progress)
            metrics = evaluate(base, reasoning, hybrid, heldout, tokenizer.pad_token_id, cfg)
    finally:
        torch.set_num_threads(threads)
    metrics.update(base_train_loss=base_loss, reasoning_train_loss=reasoning_loss, adapter_final=final,
                   config=asdict(cfg), key=cfg.key())
    for param in hybrid.parameters():
        param.requires_grad_(False)
    hybrid.save_pretrained(str(out), safe_serialization=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary(metrics: dict) -> list[str]:
    """What training reached, as lines for people."""
    l0 = metrics["l0_per_layer"]
    dead = metrics["dead_features_per_layer"]
    n = metrics["config"]["n_features"]
    return [
        f"held-out thinking tokens ({metrics['heldout_thinking_tokens']} in {metrics['heldout_traces']} traces): "
        f"next-token accuracy base {metrics['base_thinking_accuracy']:.1%}, "
        f"reasoning {metrics['reasoning_thinking_accuracy']:.1%}",
        f"KL(reasoning || base MLPs only) {metrics['kl_adapters_off']:.3f} nats/token, "
        f"KL(reasoning || base MLPs + adapters) {metrics['kl_adapters_on']:.3f}: "
        f"{metrics['kl_gap_recovered']:.1%} of the KL gap recovered",
        "L0 per layer " + " / ".join(f"{v:.1f}" for v in l0) + f" (mean {sum(l0) / len(l0):.1f}); dead features "
        + " / ".join(str(d) for d in dead) + f" of {n} per layer",
    ]
