"""Writes random-weight PerceptionLM checkpoints with the Hugging Face hub's exact file layout.

    plm-make-checkpoint --preset tiny --out checkpoints/tiny
    python -m plm_core.testing.make_checkpoint --preset bench --out checkpoints/bench

Presets: `tiny` (unit tests: 56-pixel tiles, 4 tokens a tile, seconds on a CPU), `tiny-nocls`
(the same with an 8B-style vision tower without a CLS token), `bench` (CPU benchmarks: real
448-pixel tiles, 256 tokens a tile, small widths), `bench-nocls`, and `1b` (PLM-1B's dimensions,
bf16, for GPU runs). Files are written by transformers' own `save_pretrained`, so the layout is the
one `facebook/Perception-LM-*` uses: config.json, generation_config.json, model safetensors (with an
index when sharded), tokenizer.json / tokenizer_config.json, preprocessor_config.json,
video_preprocessor_config.json, processor_config.json and the chat template.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PerceptionLMConfig

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}"
    "    {%- set system_message = 'You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.' %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<|image|>' }}"
    "{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<|video|>' }}"
    "{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{- content['text'] | trim }}"
    "{%- endfor %}"
    "{{'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
PE_LARGE = "vit_pe_core_large_patch14_336"  # PLM-1B/3B's tower, with a CLS token
PE_GIGANTIC = "vit_pe_core_gigantic_patch14_448"  # PLM-8B's tower, without one


@dataclass(frozen=True)
class Preset:
    """Dimensions of one random checkpoint."""

    vision_arch: str
    vision_width: int
    vision_depth: int
    vision_heads: int
    tile_size: int
    use_cls_token: bool
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 11520
    dtype: str = "float32"
    max_shard_size: str = "5GB"
    vision_mlp_ratio: float | None = None
    extra_vision_args: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        vision_arch=PE_LARGE,
        vision_width=32,
        vision_depth=2,
        vision_heads=2,
        tile_size=56,
        use_cls_token=True,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
    ),
    "tiny-nocls": Preset(
        vision_arch=PE_GIGANTIC,
        vision_width=48,
        vision_depth=2,
        vision_heads=2,
        tile_size=56,
        use_cls_token=False,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vision_mlp_ratio=3.0,
    ),
    "bench": Preset(
        vision_arch=PE_LARGE,
        vision_width=64,
        vision_depth=2,
        vision_heads=4,
        tile_size=448,
        use_cls_token=True,
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=2,
        intermediate=512,
        max_shard_size="200MB",
    ),
    "bench-nocls": Preset(
        vision_arch=PE_GIGANTIC,
        vision_width=64,
        vision_depth=2,
        vision_heads=4,
        tile_size=448,
        use_cls_token=False,
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=2,
        intermediate=512,
    ),
    "1b": Preset(
        vision_arch=PE_LARGE,
        vision_width=1024,
        vision_depth=23,
        vision_heads=16,
        tile_size=448,
        use_cls_token=True,
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        dtype="bfloat16",
        max_shard_size="2GB",
    ),
}


def build_config(preset: Preset) -> PerceptionLMConfig:
    """The `PerceptionLMConfig` of a preset (vision tower, projector, Llama decoder, token ids)."""
    from transformers import LlamaConfig, PerceptionLMConfig, TimmWrapperConfig

    grid = preset.tile_size // 14
    model_args = {
        "depth": preset.vision_depth,
        "embed_dim": preset.vision_width,
        "num_heads": preset.vision_heads,
        "global_pool": "",
        "img_size": [preset.tile_size, preset.tile_size],
        "ref_feat_shape": [grid, grid],
        "use_post_transformer_norm": False,
        "init_values": 0.1,
        **preset.extra_vision_args,
    }
    if preset.vision_mlp_ratio is not None:
        model_args["mlp_ratio"] = preset.vision_mlp_ratio
    # num_labels is a PretrainedConfig keyword that TimmWrapperConfig's signature does not list
    vision = TimmWrapperConfig(  # type: ignore[call-arg]
        architecture=preset.vision_arch, model_args=model_args, num_labels=0, do_pooling=False
    )
    text = LlamaConfig(
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        vocab_size=128256,
        rms_norm_eps=1e-5,
        max_position_embeddings=preset.max_positions,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
        bos_token_id=128000,
        eos_token_id=[128001, 128009],
        tie_word_embeddings=False,
    )
    return PerceptionLMConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projector_pooling_ratio=2,
        vision_use_cls_token=preset.use_cls_token,
        image_token_id=128002,
        video_token_id=128003,
    )


def _randomize_text_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draws the decoder and projector weights at a scale that keeps activations O(1).

    HF's default init (std 0.02) gives near-uniform logits and a model that repeats one token; a
    fan-in scale gives peaked, varied logits, so greedy outputs are distinct and meaningful to
    compare token by token.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def write_checkpoint(
    preset_name: str, out: str | Path, *, seed: int = 0, overwrite: bool = False
) -> Path:
    """Writes the preset's random checkpoint to `out` (a directory) and returns its path."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    out = Path(out)
    if out.exists():
        if not overwrite and (out / "config.json").exists():
            raise FileExistsError(
                f"{out} already holds a checkpoint (pass --overwrite to replace it)"
            )
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_model(preset, seed, tmp)
    _save_processor(preset, tmp)
    (tmp / "plm_serve_preset.json").write_text(
        json.dumps({"preset": preset_name, "seed": seed}) + "\n"
    )
    tmp.rename(out)
    return out


def _save_model(preset: Preset, seed: int, path: Path) -> None:
    """Writes the config, the random weights and the generation config."""
    import torch
    from transformers import GenerationConfig, PerceptionLMForConditionalGeneration

    torch.manual_seed(seed)
    config = build_config(preset)
    dtype = getattr(torch, preset.dtype)
    model = PerceptionLMForConditionalGeneration(config)
    # transformers leaves eval() and GenerationConfig() unannotated
    model.eval()  # type: ignore[no-untyped-call, unused-ignore]
    _randomize_text_weights(model, seed)
    model = model.to(dtype)
    model.config.dtype = preset.dtype
    model.save_pretrained(path, max_shard_size=preset.max_shard_size)
    generation = GenerationConfig(  # type: ignore[no-untyped-call, unused-ignore]
        do_sample=False, bos_token_id=128000, eos_token_id=[128001, 128009]
    )
    generation.save_pretrained(path)


def _save_processor(preset: Preset, path: Path) -> None:
    """Writes the tokenizer, the image and video processors' configs and the chat template."""
    from transformers import (
        PerceptionLMImageProcessor,
        PerceptionLMProcessor,
        PerceptionLMVideoProcessor,
        PreTrainedTokenizerFast,
    )

    from plm_core.testing.tokenizer import (
        BOS,
        END_OF_TEXT,
        EOT,
        IMAGE,
        VIDEO,
        build_llama3_style_tokenizer,
    )

    # transformers leaves the tokenizer's and the processor's constructors unannotated
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call, unused-ignore]
        tokenizer_object=build_llama3_style_tokenizer(),
        bos_token=BOS,
        eos_token=EOT,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=preset.max_positions,
        clean_up_tokenization_spaces=True,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO, "pad_token": END_OF_TEXT},
    )
    size = {"height": preset.tile_size, "width": preset.tile_size}
    image_processor = PerceptionLMImageProcessor(
        vision_input_type="thumb+tile",
        tile_size=preset.tile_size,
        max_num_tiles=36,
        size=size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = PerceptionLMVideoProcessor(size=dict(size))
    processor = PerceptionLMProcessor(  # type: ignore[no-untyped-call, unused-ignore]
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=14,
        pooling_ratio=2,
    )
    processor.save_pretrained(path)
    _split_processor_config(path)


def _split_processor_config(path: Path) -> None:
    """Rewrites transformers 5's nested processor_config.json into the hub's three files.

    The hub repos (converted with transformers 4.x) keep preprocessor_config.json and
    video_preprocessor_config.json beside a small processor_config.json; readers must handle both.
    """
    nested = json.loads((path / "processor_config.json").read_text())
    image = dict(nested.pop("image_processor"), processor_class="PerceptionLMProcessor")
    image["image_processor_type"] = "PerceptionLMImageProcessorFast"
    video = dict(nested.pop("video_processor"), processor_class="PerceptionLMProcessor")
    for name, data in (
        ("preprocessor_config.json", image),
        ("video_preprocessor_config.json", video),
        ("processor_config.json", nested),
    ):
        (path / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plm-make-checkpoint",
        description="Write a random-weight PerceptionLM checkpoint in the Hugging Face hub layout.",
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="checkpoint size (default: tiny)"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed for the weights (default: 0)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing checkpoint at --out"
    )
    args = parser.parse_args(argv)
    path = write_checkpoint(args.preset, args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.preset} checkpoint to {path}")
    for f in sorted(path.iterdir()):
        print(f"  {f.name}  {f.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
