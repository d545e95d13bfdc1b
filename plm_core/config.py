"""The engine's one frozen configuration tree: `EngineConfig` with scheduler, cache and media.

Every leaf field is also a command-line option (`plm_core.cli_args` builds the parser from these
dataclasses): its help text is the field's `help` metadata, its flag the field name with dashes.
Adding an option is adding one field here (or to `server.config.ServerConfig`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from plm_core.cli_args import fraction

DEFAULT_MODEL = "facebook/Perception-LM-1B"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # width x height of an image; also the per-frame ceiling
DEFAULT_MAX_IMAGE_SIDE = 32768  # longest side of an image or video frame, from its header
DEFAULT_MAX_DECODED_PIXELS = 2**28  # frames x width x height decoded per video (32 frames of 4K)


def latency_target(text: str) -> str:
    """'auto', 'off' or a positive number of milliseconds (kept as text)."""
    if text in ("auto", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(
            f"step_latency_target must be 'auto', 'off' or milliseconds > 0, got {text!r}"
        )
    return text


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field that is also a command-line option: `help` for --help; `extra` may set
    `flag` (another option name), `negative_flag`, `choices`, `parse` (str -> value), `hidden`."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("config fields are immutable: use a tuple")
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling: what one engine step may hold, and in which order requests are admitted."""

    max_num_seqs: int = opt(64, "sequences running at once")
    max_num_batched_tokens: int = opt(
        8192,
        "tokens per engine step (prefill chunks + decodes); with nothing decoding, a prompt up to "
        "this long prefills in one step (fastest to its first token); while streams decode, "
        "--step-latency-target keeps steps shorter",
    )
    max_encoder_tiles_per_step: int = opt(
        64,
        "image tiles / video frames through the vision encoder per engine step (larger items "
        "span several steps)",
    )
    enable_chunked_prefill: bool = opt(
        True, "split long prompts over several steps, so running streams keep decoding"
    )
    step_latency_target: str = opt(
        "auto",
        "how long a step that carries decodes may take while prompts prefill and images encode: "
        "'auto' (2.5x the measured time of a plain decode step), milliseconds, or 'off' (only "
        "the token and tile limits). Lower keeps running streams smoother while a new prompt "
        "prefills, at the cost of that prompt's time to first token",
        parse=latency_target,
        metavar="auto|MS|off",
    )
    scheduling_policy: str = opt(
        "fcfs",
        "admission order and preemption victim: fcfs (arrival order) or priority (the request's "
        "`priority`, lower first, ties by arrival)",
        choices=("fcfs", "priority"),
    )

    def __post_init__(self) -> None:
        latency_target(self.step_latency_target)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_encoder_tiles_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class CacheConfig:
    """Caches: the paged KV cache, its prefix cache and the vision-encoder cache."""

    block_size: int = opt(16, "tokens per KV-cache block")
    kv_cache_memory_gb: float | None = opt(
        None,
        "KV cache size in GiB (default: 2 GiB on CPU; on a GPU what --gpu-memory-utilization "
        "leaves)",
    )
    gpu_memory_utilization: float = opt(
        0.9,
        "share of the GPU's memory this engine may take: weights, a measured worst-case step's "
        "activations, the encoder cache and the KV cache (the rest)",
        parse=fraction,
    )
    enable_prefix_caching: bool = opt(
        True,
        "reuse the KV of prompt prefixes seen before (text, images and videos by content)",
        negative_flag="--no-prefix-caching",
    )
    encoder_cache_tokens: int | None = opt(
        None, "vision-encoder cache budget in LM tokens (default: max(65536, 2 x max-model-len))"
    )

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class MediaConfig:
    """Media: how images and videos are sampled and tiled by default, and the ceilings checked
    before anything is decoded, so bad input costs little."""

    max_num_tiles: int | None = opt(
        None, "default tile budget per image (default: the checkpoint's, 36 for PLM)"
    )
    default_num_frames: int = opt(32, "frames sampled per video when the request names none")
    max_num_frames: int = opt(
        64,
        "ceiling on frames per video; requests asking for more (num_frames or fps) get this many",
    )
    max_image_pixels: int = opt(
        DEFAULT_MAX_IMAGE_PIXELS,
        "largest image (width x height, read from the header before decoding); also per frame",
    )
    max_image_side: int = opt(
        DEFAULT_MAX_IMAGE_SIDE,
        "longest side in pixels of an image or video frame (read from the header before decoding)",
    )
    max_video_duration: float = opt(
        3600.0, "longest video in seconds (read from the container before decoding); 0 = no limit"
    )
    max_video_pixels: int = opt(
        DEFAULT_MAX_DECODED_PIXELS,
        "frames x width x height decoded per video, checked from the container before decoding "
        "(32 frames of 4K fit); larger requests are refused, asking for fewer frames",
    )
    max_media_bytes: int | None = opt(
        None, "largest image or video read from a data: URL or a local file (default: no limit)"
    )
    raw_media_cache_entries: int = opt(
        4096,
        "images/videos whose sizes and hashes are remembered by their bytes, so that a repeat the "
        "engine still holds is neither decoded nor preprocessed again (0: off)",
    )
    allowed_local_media_path: str | None = opt(
        None,
        "directory whose files clients may send as file:// URLs or paths (default: none allowed; "
        "'/' allows any)",
    )

    def __post_init__(self) -> None:
        if self.max_num_tiles is not None and self.max_num_tiles < 1:
            raise ValueError(f"max_num_tiles must be at least 1, got {self.max_num_tiles}")
        for name in ("default_num_frames", "max_num_frames", "max_image_pixels", "max_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_video_duration < 0:
            raise ValueError("max_video_duration must be >= 0 (0 = no limit)")


@dataclass(frozen=True)
class EngineConfig:
    """Model and engine: the one configuration of the engine, from the CLI, `LLM(...)` or a test.

    `model` is a local directory or a hub id; everything else has a serving default.
    """

    model: str = opt(DEFAULT_MODEL, "hub id or local checkpoint directory")
    revision: str | None = opt(None, "hub revision (branch, tag or commit)")
    download_dir: str | None = opt(None, "hub cache directory (default: huggingface_hub's)")
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: str = opt(
        "auto",
        "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16",
        choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
    )
    max_model_len: int | None = opt(None, "context length (default: the model's)")
    cuda_graphs: bool = opt(
        False, "replay decode steps as CUDA graphs, bucketed by batch and context (GPU; opt-in)"
    )
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    media: MediaConfig = field(default_factory=MediaConfig)

    @classmethod
    def from_flat(cls, **values: Any) -> EngineConfig:
        """An EngineConfig from flat field names (`max_num_seqs=4`, `block_size=8`), as `LLM(...)`
        and the tests write them; a TypeError names any field no config has."""
        return cls(**_route(cls, values, top=True))

    def replace(self, **values: Any) -> EngineConfig:
        """A copy with flat fields changed (`config.replace(max_num_seqs=8)`)."""
        flat = {**flatten(self), **values}
        return EngineConfig.from_flat(**flat)


def _route(cls: type, values: dict[str, Any], *, top: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = f.default_factory
        if (
            sub is not dataclasses.MISSING
            and isinstance(sub, type)
            and dataclasses.is_dataclass(sub)
        ):
            kwargs[f.name] = values.pop(f.name) if f.name in values else sub(**_route(sub, values))
        elif f.name in values:
            kwargs[f.name] = values.pop(f.name)
    if top and values:
        raise TypeError(f"unknown engine option(s): {', '.join(sorted(values))}")
    return kwargs


def flatten(config: Any) -> dict[str, Any]:
    """Leaf fields of a config tree by name (nested configs' fields inlined)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value))
        else:
            out[f.name] = value
    return out
