"""The model's facts, read from a checkpoint's files into frozen dataclasses (`ModelConfig`).

`ModelConfig` is parsed from the checkpoint's JSON files (config.json, processor and preprocessor
configs), accepting both the transformers 4.x layout the hub repos were written with
(`rope_scaling` + `rope_theta`, `torch_dtype`, separate preprocessor files) and the 5.x layout
(`rope_parameters`, `dtype`, processors nested in processor_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's configuration is missing, malformed or not a PerceptionLM."""


@dataclass(frozen=True)
class TextConfig:
    """The Llama decoder's dimensions."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 scaling parameters, or None for plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass(frozen=True)
class VisionConfig:
    """The timm Perception Encoder tower and the projector's pooling."""

    architecture: str
    model_args: dict
    width: int
    use_cls_token: bool
    pooling_ratio: int
    patch_size: int


@dataclass(frozen=True)
class ProcessorConfig:
    """How images and video frames become tiles, and how many tokens a tile costs."""

    tile_size: int = 448
    max_num_tiles: int = 36
    vision_input_type: str = "thumb+tile"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_size: int = 448
    patch_size: int = 14
    pooling_ratio: int = 2

    @property
    def tokens_per_tile(self) -> int:
        side = self.tile_size // self.patch_size // self.pooling_ratio
        return side * side

    @property
    def tokens_per_frame(self) -> int:
        side = self.video_size // self.patch_size // self.pooling_ratio
        return side * side


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about one checkpoint."""

    path: Path
    text: TextConfig
    vision: VisionConfig
    processor: ProcessorConfig
    image_token_id: int
    video_token_id: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: str  # as saved: "bfloat16", "float32", ...
    chat_template: str

    @property
    def max_model_len(self) -> int:
        return self.text.max_position_embeddings


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path.name} in {path.parent} is not valid JSON: {e}") from e


def _text_config(d: dict) -> TextConfig:
    hidden = int(d["hidden_size"])
    heads = int(d["num_attention_heads"])
    rope = d.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling") or (rope if rope else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ConfigError(
                f"unsupported rope scaling type {kind!r} (PerceptionLM uses llama3 or none)"
            )
        else:
            scaling = {
                k: scaling[k]
                for k in (
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                )
            }
    return TextConfig(
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        vocab_size=int(d["vocab_size"]),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 11520)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
    )


def _chat_template(path: Path, tokenizer_config: dict, processor_config: dict) -> str:
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    as_json = path / "chat_template.json"
    if as_json.exists():
        return _read_json(as_json)["chat_template"]
    for source in (processor_config, tokenizer_config):
        template = source.get("chat_template")
        if isinstance(template, str):
            return template
    raise ConfigError(
        f"no chat template in {path} (looked for chat_template.jinja, chat_template.json, "
        "processor_config.json and tokenizer_config.json)"
    )


def load_model_config(path: str | Path) -> ModelConfig:
    """Parses a local PerceptionLM checkpoint directory; raises ConfigError naming what is wrong."""
    path = Path(path)
    cfg = _model_json(path)
    proc_cfg = _optional_json(path / "processor_config.json")
    processor = _processor_config(path, cfg, proc_cfg)
    vcfg = cfg["vision_config"]
    model_args = dict(vcfg.get("model_args") or {})
    vision = VisionConfig(
        architecture=str(vcfg.get("architecture")),
        model_args=model_args,
        width=int(model_args.get("embed_dim", 1024)),
        use_cls_token=bool(cfg.get("vision_use_cls_token", True)),
        pooling_ratio=processor.pooling_ratio,
        patch_size=processor.patch_size,
    )
    tok_cfg = _optional_json(path / "tokenizer_config.json")
    gen_cfg = _optional_json(path / "generation_config.json")
    text_cfg = cfg["text_config"]
    eos = gen_cfg.get("eos_token_id", text_cfg.get("eos_token_id", [128001, 128009]))
    bos = gen_cfg.get("bos_token_id", text_cfg.get("bos_token_id", 128000))
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text_cfg.get("dtype") or "float32"
    return ModelConfig(
        path=path,
        text=_text_config(text_cfg),
        vision=vision,
        processor=processor,
        image_token_id=int(cfg.get("image_token_id", 128002)),
        video_token_id=int(cfg.get("video_token_id", 128003)),
        bos_token_id=int(bos),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
        checkpoint_dtype=str(dtype),
        chat_template=_chat_template(path, tok_cfg, proc_cfg),
    )


def _model_json(path: Path) -> dict[str, Any]:
    """config.json, checked to be a PerceptionLM's with text and vision configs."""
    try:
        cfg = _read_json(path / "config.json")
    except FileNotFoundError:
        raise ConfigError(
            f"{path} has no config.json: not a Hugging Face checkpoint directory"
        ) from None
    model_type = cfg.get("model_type")
    if model_type != "perception_lm":
        raise ConfigError(
            f"{path} holds a {model_type!r} model; plm-serve serves PerceptionLM "
            "(model_type 'perception_lm') checkpoints only"
        )
    for key in ("text_config", "vision_config"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"config.json in {path} lacks {key}")
    return cfg


def _rgb(values: Any) -> tuple[float, float, float]:
    r, g, b = (float(x) for x in values)
    return r, g, b


def _processor_config(path: Path, cfg: dict[str, Any], proc_cfg: dict[str, Any]) -> ProcessorConfig:
    """Tiling and normalisation from the image and video preprocessor configs (separate files in
    the 4.x layout, nested in processor_config.json in 5.x)."""
    image_cfg = _optional_json(path / "preprocessor_config.json")
    image_cfg = image_cfg or proc_cfg.get("image_processor", {})
    video_cfg = _optional_json(path / "video_preprocessor_config.json")
    video_cfg = video_cfg or proc_cfg.get("video_processor", {})
    if not image_cfg:
        raise ConfigError(f"{path} has no image processor configuration (preprocessor_config.json)")
    tile_size = int(image_cfg.get("tile_size", 448))
    return ProcessorConfig(
        tile_size=tile_size,
        max_num_tiles=int(image_cfg.get("max_num_tiles", 36)),
        vision_input_type=str(image_cfg.get("vision_input_type", "thumb+tile")),
        image_mean=_rgb(image_cfg.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=_rgb(image_cfg.get("image_std", (0.5, 0.5, 0.5))),
        video_size=int((video_cfg.get("size") or {}).get("height", tile_size)),
        patch_size=int(proc_cfg.get("patch_size") or 14),
        pooling_ratio=int(cfg.get("projector_pooling_ratio", proc_cfg.get("pooling_ratio", 1))),
    )


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.exists() else {}
