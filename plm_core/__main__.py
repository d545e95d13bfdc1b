"""`python -m plm_core`: one chat with the offline engine, printed to the terminal.

python -m plm_core --image photo.jpg --prompt "Describe the image."
python -m plm_core --demo --video clip.mp4 --prompt "What happens?"   # offline random checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass

from plm_core.cli_args import HelpFormatter, add_config_options, parse_config
from plm_core.config import EngineConfig, opt
from plm_core.demo import demo_checkpoint


def _demo_image():
    """A generated picture, so the demo needs no files."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (30, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((220, 140, 420, 340), fill=(250, 200, 40))
    draw.rectangle((0, 400, 640, 480), fill=(40, 140, 60))
    return img


@dataclass(frozen=True)
class ChatOptions:
    """Chat: what to ask, and how to sample the answer."""

    demo: str | None = opt(
        None,
        "use an offline random-weight demo checkpoint (tiny or bench) instead of --model",
        metavar="PRESET",
        nargs="?",
        const="tiny",
    )
    image: tuple[str, ...] = opt((), "image path or URL (repeatable)", action="append")
    video: tuple[str, ...] = opt((), "video path or URL (repeatable)", action="append")
    prompt: str = opt("Describe the image in detail.", "the user's question")
    system: str | None = opt(None, "system prompt (default: the checkpoint's template default)")
    max_tokens: int = opt(64, "tokens to generate at most")
    temperature: float = opt(0.0, "0 is greedy")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    seed: int | None = opt(None, "sampling seed")
    num_frames: int | None = opt(None, "frames sampled per video (default: --default-num-frames)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plm_core",
        description=(__doc__ or "").split("\n")[0],
        formatter_class=HelpFormatter,
    )
    add_config_options(parser, ChatOptions)
    add_config_options(parser, EngineConfig)
    chat: ChatOptions = parse_config(parser, ChatOptions, argv)
    config: EngineConfig = parse_config(parser, EngineConfig, argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _chat(chat, config)
    except ValueError as e:  # ConfigError, CheckpointError, InputError: the user's to fix
        print(f"error: {e}", file=sys.stderr)
        return 1


def _chat(chat: ChatOptions, config: EngineConfig) -> int:
    from plm_core import LLM, MediaOptions, SamplingParams

    if chat.demo:
        config = dataclasses.replace(config, model=str(demo_checkpoint(chat.demo)), revision=None)
    if config.media.allowed_local_media_path is None:  # the user's own files
        config = config.replace(allowed_local_media_path="/")
    llm = LLM(config=config)
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": u}} for u in chat.image]
    parts += [{"type": "video_url", "video_url": {"url": u}} for u in chat.video]
    if not parts:
        parts.append({"type": "image", "image": _demo_image()})
    parts.append({"type": "text", "text": chat.prompt})
    system = [{"role": "system", "content": chat.system}] if chat.system else []
    params = SamplingParams(
        temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed, max_tokens=chat.max_tokens
    )
    media = MediaOptions(num_frames=chat.num_frames)
    out = llm.chat(system + [{"role": "user", "content": parts}], params, media_options=media)[0]
    m = out.metrics
    print(out.text)
    print(
        f"\n[{m['prompt_tokens']} prompt tokens, {m['completion_tokens']} generated, "
        f"finish_reason={out.finish_reason}, first token {m['ttft_s']:.2f}s, "
        f"total {m['e2e_s']:.2f}s]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
