"""Qwen2 with transcoder adapters, in the original checkpoint format, and its strict loader.

The adapter runs beside the unchanged SwiGLU MLP: ``mlp(x) = down(silu(gate x) * up x) + W_dec relu(W_enc x + b_enc) (+ b_dec)``.
The checkpoint is a normal Qwen2 checkpoint whose config carries ``transcoder_n_features`` and
``transcoder_dec_bias`` and whose weights add ``model.layers.{i}.mlp.transcoder_enc.{weight,bias}`` and
``model.layers.{i}.mlp.transcoder_dec.weight`` (+ ``.bias``). Unlike the original loader, a missing or
misshapen adapter weight is an error, never silently random.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from .errors import UserError

ARCHITECTURE = "Qwen2ForCausalLMWithTranscoder"
FeatureHook = Callable[[int, torch.Tensor], None]


class TranscoderAdapterMLP(Qwen2MLP):
    """The base MLP plus a parallel sparse adapter; ``feature_hook(layer, acts)`` sees every forward's features."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config)
        self.layer_idx = layer_idx
        n_features = int(config.transcoder_n_features)
        self.transcoder_enc = nn.Linear(config.hidden_size, n_features, bias=True)
        self.transcoder_dec = nn.Linear(n_features, config.hidden_size, bias=bool(getattr(config, "transcoder_dec_bias", False)))
        self.feature_hook: FeatureHook | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.transcoder_enc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encode(x)
        if self.feature_hook is not None:
            self.feature_hook(self.layer_idx, features)
        return super().forward(x) + self.transcoder_dec(features)


class Qwen2ForCausalLMWithTranscoder(Qwen2ForCausalLM):
    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.mlp = TranscoderAdapterMLP(config, i)
        self.post_init()

    def adapters(self) -> list[TranscoderAdapterMLP]:
        return [layer.mlp for layer in self.model.layers]


@dataclass
class CheckpointInfo:
    """What the store records about a model so that a later run can refuse a different one."""

    name: str  # what the user passed (path or repo id)
    path: str  # resolved local directory
    revision: str | None
    n_layers: int
    n_features: int | None  # None for a plain model (neuron source only)
    d_model: int
    d_mlp: int
    vocab_size: int
    dec_bias: bool
    fingerprint: str  # sha256 of config.json: identifies the architecture, not the weights' bytes

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local directory as is; an ``owner/name`` repo id through the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"model path {model!r} is a file; pass the checkpoint directory")
    if not _REPO_ID.match(model) or model.startswith((".", "/")):
        raise UserError(f"model path {model!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "merges.txt", "vocab*"],
        )
    except Exception as exc:  # network, auth, missing repo: all one-line errors for the user
        raise UserError(f"could not fetch model {model!r} from the Hugging Face Hub ({type(exc).__name__}); "
                        "pass a local checkpoint directory when offline") from None
    return Path(local)


def read_config(path: Path) -> Qwen2Config:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{path} has no config.json: not a model checkpoint")
    try:
        return Qwen2Config.from_pretrained(str(path))
    except Exception as exc:
        raise UserError(f"cannot read {cfg_file}: {exc}") from None


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def expected_adapter_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    n_features, d_model = int(config.transcoder_n_features), config.hidden_size
    expected = {}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        expected[prefix + "transcoder_enc.weight"] = (n_features, d_model)
        expected[prefix + "transcoder_enc.bias"] = (n_features,)
        expected[prefix + "transcoder_dec.weight"] = (d_model, n_features)
        if getattr(config, "transcoder_dec_bias", False):
            expected[prefix + "transcoder_dec.bias"] = (d_model,)
    return expected


def check_adapter_weights(path: Path, config: Qwen2Config) -> None:
    """Fail with one clear line if any adapter tensor is missing or has the wrong shape."""
    shapes = _safetensors_shapes(path)
    problems = []
    for key, shape in expected_adapter_shapes(config).items():
        if key not in shapes:
            problems.append(f"{key} missing")
        elif shapes[key] != shape:
            problems.append(f"{key} has shape {list(shapes[key])}, expected {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"checkpoint {path} has bad transcoder adapter weights: {'; '.join(problems[:3])}{more}")


def has_adapter(config: Qwen2Config) -> bool:
    return getattr(config, "transcoder_n_features", None) is not None


def checkpoint_info(name: str, path: Path, config: Qwen2Config, revision: str | None = None) -> CheckpointInfo:
    import hashlib

    fingerprint = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return CheckpointInfo(
        name=name,
        path=str(path),
        revision=revision,
        n_layers=config.num_hidden_layers,
        n_features=int(config.transcoder_n_features) if has_adapter(config) else None,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        vocab_size=config.vocab_size,
        dec_bias=bool(getattr(config, "transcoder_dec_bias", False)),
        fingerprint=fingerprint,
    )


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    return table[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | None) -> str:
    """The device to run on (default: cuda when available); a one-line UserError naming the devices that exist
    for one this machine does not have, before anything is loaded."""
    if device is None:
        return default_device()
    existing = available_devices()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {device!r}; this machine has {', '.join(existing)}") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: CUDA is not available on this machine; devices here: {', '.join(existing)}")
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device{'s' if count != 1 else ''}; "
                            f"devices here: {', '.join(existing)}")
        return device
    if parsed.type == "mps" and "mps" in existing:
        return device
    raise UserError(f"--device {device}: not available on this machine; devices here: {', '.join(existing)}")


def load_model(
    model: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    revision: str | None = None,
    require_adapter: bool = True,
) -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint for inference (eval mode, frozen parameters).

    With an adapter the model is :class:`Qwen2ForCausalLMWithTranscoder`; without one (allowed only when
    ``require_adapter`` is false, for the neuron baseline) it is a plain ``Qwen2ForCausalLM``.
    """
    device = resolve_device(device)
    path = resolve_checkpoint(model, revision)
    config = read_config(path)
    if has_adapter(config):
        check_adapter_weights(path, config)
        cls = Qwen2ForCausalLMWithTranscoder
    elif require_adapter:
        raise UserError(f"checkpoint {model!r} has no transcoder adapter (config.json lacks transcoder_n_features)")
    else:
        _safetensors_shapes(path)
        cls = Qwen2ForCausalLM
    torch_dtype = parse_dtype(dtype, device)
    try:
        net, loading = cls.from_pretrained(str(path), dtype=torch_dtype, output_loading_info=True)
    except Exception as exc:
        raise UserError(f"cannot load weights from {path}: {str(exc).splitlines()[0]}") from None
    missing = [k for k in loading.get("missing_keys", []) if "rotary_emb" not in k]
    if missing:
        raise UserError(f"checkpoint {path} is missing weights: {', '.join(missing[:3])}")
    net.to(device).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net, checkpoint_info(model, path, config, revision)


def load_tokenizer(path_or_id: str | os.PathLike):
    try:
        return AutoTokenizer.from_pretrained(str(path_or_id))
    except Exception as exc:
        raise UserError(f"cannot load tokenizer from {path_or_id}: {str(exc).splitlines()[0]}") from None


def save_config_extras(path: Path, **extra) -> None:
    """Add keys to a saved config.json (used by the demo builder and tests)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(extra)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def weights_fingerprint(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """Identifies the weights without reading them all: each file's size, header and three sampled slices."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            for offset in (0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)):
                handle.seek(offset)
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()
