"""PerceptionLM: timm Perception Encoder tower, 2D-pooling projector, Llama decoder, weight loading.

Parameter names mirror the hub checkpoints (`model.vision_tower.timm_model.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`) once the leading `model.`
is stripped; the legacy 4.x layout (`language_model.model.*`) is mapped too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plm_core.model.attention import AttentionMetadata
from plm_core.model.llama import LlamaModel, rope_inv_freq
from plm_core.model_config import ConfigError, ModelConfig, VisionConfig


class VisionTower(nn.Module):
    """timm's Eva/PE tower built from the checkpoint's `vision_config`; returns patch features."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import timm

        try:
            # Any: timm types create_model as a plain nn.Module, without forward_features
            self.timm_model: Any = timm.create_model(
                cfg.architecture, pretrained=False, num_classes=0, **cfg.model_args
            )
        except RuntimeError as e:
            raise ConfigError(
                f"timm {timm.__version__} cannot build vision tower {cfg.architecture!r}: {e}"
            ) from e
        self.use_cls_token = cfg.use_cls_token

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [N, 3, T, T] -> [N, P, Dv] with P = (T / patch)^2 (the CLS token dropped)
        feats: torch.Tensor = self.timm_model.forward_features(pixels)
        return feats[:, 1:, :] if self.use_cls_token else feats


class Projector(nn.Module):
    """Linear -> GELU -> Linear into the LM width, then adaptive 2D average pooling of the grid."""

    def __init__(self, vision_width: int, hidden: int, pooling_ratio: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, hidden, bias=True)
        self.linear_2 = nn.Linear(hidden, hidden, bias=True)
        self.pooling_ratio = pooling_ratio

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # feats: [N, P, Dv] -> [N, P / ratio^2, H]
        x = feats.permute(1, 0, 2)  # the same layout HF's projector computes in
        projected: torch.Tensor = self.linear_2(F.gelu(self.linear_1(x)))
        x = projected.permute(1, 0, 2)
        if self.pooling_ratio <= 1:
            return x
        n, p, c = x.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"vision tower returned {p} patches, not a square grid")
        out = side // self.pooling_ratio
        x = x.permute(0, 2, 1).reshape(n, c, side, side)
        x = F.adaptive_avg_pool2d(x, (out, out))
        return x.flatten(2).transpose(1, 2)


class PerceptionLM(nn.Module):
    """The whole model: `encode_media` turns tiles into LM-space tokens, `forward` runs the LM."""

    def __init__(self, cfg: ModelConfig, vision_tower: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = vision_tower if vision_tower is not None else VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(
            cfg.vision.width, cfg.text.hidden_size, cfg.vision.pooling_ratio
        )
        self.language_model = LlamaModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @torch.inference_mode()
    def encode_media(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [N, 3, T, T] -> [N, tokens_per_tile, H]
        tokens: torch.Tensor = self.multi_modal_projector(self.vision_tower(pixels))
        return tokens

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.language_model.embed_tokens(token_ids)
        return embeds

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        # embeds: [T, H] flattened batch; logit_rows: [B] rows whose next-token logits are needed
        # -> [B, V] fp32
        hidden = self.language_model(embeds, positions, kv_caches, meta)
        logits: torch.Tensor = self.lm_head(hidden.index_select(0, logit_rows))
        return logits.float()


def _map_key(key: str) -> str:
    if key.startswith("model."):
        return key[len("model.") :]
    if key.startswith("language_model.model."):
        return "language_model." + key[len("language_model.model.") :]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    return key


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise ConfigError(
                f"checkpoint at {path} is missing weight shards: {', '.join(missing)}"
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {path}")
    return files


def load_weights(model: PerceptionLM, path: Path) -> None:
    """Copies every checkpoint tensor into `model` (onto each parameter's device and dtype).

    Raises ConfigError on missing, unexpected or wrongly shaped weights.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    buffers = {k: v for k, v in model.named_buffers() if k in model.state_dict()}
    expected = set(params) | set(buffers)
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = _map_key(key)
                target = params.get(name, buffers.get(name))
                if target is None:
                    if not name.endswith("rotary_emb.inv_freq"):
                        unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ConfigError(
                        f"weight {key} has shape {tuple(tensor.shape)}, the config implies "
                        f"{tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                seen.add(name)
    missing = expected - seen
    if model.cfg.text.tie_word_embeddings and "lm_head.weight" in missing:
        model.lm_head.weight = model.language_model.embed_tokens.weight
        missing.discard("lm_head.weight")
    if missing:
        shown = ", ".join(sorted(missing)[:8])
        raise ConfigError(
            f"checkpoint at {path} lacks {len(missing)} weights the model needs, e.g. {shown}"
        )
    if unexpected:
        raise ConfigError(
            f"checkpoint at {path} has {len(unexpected)} weights this model does not use, "
            f"e.g. {', '.join(unexpected[:5])}"
        )


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype) -> PerceptionLM:
    """Builds the model straight in `dtype` and loads the checkpoint into it.

    The decoder and projector are created on the meta device and materialised on `device` (no
    fp32 copy of an 8B decoder in host memory); timm's PE tower cannot be built on the meta device,
    so it is built on the CPU and moved.
    """
    with _default_dtype(dtype):
        vision = VisionTower(cfg.vision)
        with torch.device("meta"):
            model = PerceptionLM(cfg, vision_tower=nn.Identity())
    model.vision_tower = vision.to(device)
    for name in ("multi_modal_projector", "language_model", "lm_head"):
        getattr(model, name).to_empty(device=device)
    model.language_model.inv_freq = rope_inv_freq(cfg.text).to(device)
    load_weights(model, cfg.path)
    if device.type == "cpu":
        lm_head_columns_contiguous(model)
    # inference only: no autograd state, even in CUDA graph capture
    return model.eval().requires_grad_(False)


def lm_head_columns_contiguous(model: PerceptionLM) -> None:
    """Stores the LM head's weight [V, H] transposed in memory (as a view of a contiguous
    [H, V]), so the logits' matmul streams it row by row: on a CPU the head, most of a small
    model's decode step, takes 5 ms instead of 14-15 ms for one row of a 128k x 256 head and
    25 instead of 33 ms for 16 rows (the same values; a one-row product may differ in the last
    bit). A tied head gets its own copy, leaving the embedding table as it is for row lookups."""
    weight = model.lm_head.weight
    model.lm_head.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)
