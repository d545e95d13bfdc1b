"""`python -m plm_core`: one chat with the offline engine, printed to the terminal.

python -m plm_core --image photo.jpg --prompt "Describe the image."
python -m plm_core --demo --video clip.mp4 --prompt "What happens?"   # offline random checkpoint
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path


def demo_dir() -> Path:
    """Where demo checkpoints go: $PLM_SERVE_CACHE, else $XDG_CACHE_HOME/plm-serve, else ~/.cache/plm-serve."""
    root = os.environ.get("PLM_SERVE_CACHE")
    if root:
        return Path(root) / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "plm-serve" / "checkpoints"


def demo_checkpoint(preset: str = "tiny") -> Path:
    """Builds (once) a random-weight demo checkpoint under demo_dir() and returns its path.

    It is written to a private folder and renamed into place, so replicas sharing one cache volume
    can start together: the first rename wins and the others use its files.
    """
    from plm_core.testing.make_checkpoint import write_checkpoint

    path = demo_dir() / f"demo-{preset}"
    if not (path / "config.json").exists():
        print(
            f"building the offline demo checkpoint ({preset}, random weights) in {path} ...",
            file=sys.stderr,
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        write_checkpoint(preset, tmp, overwrite=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "config.json").exists():
                raise
    return path


def _demo_image():
    """A generated picture, so the demo needs no files."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (30, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((220, 140, 420, 340), fill=(250, 200, 40))
    draw.rectangle((0, 400, 640, 480), fill=(40, 140, 60))
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m plm_core",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default="facebook/Perception-LM-1B", help="hub id or local checkpoint directory"
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--demo",
        nargs="?",
        const="tiny",
        default=None,
        metavar="PRESET",
        help="use an offline random-weight demo checkpoint (tiny or bench) instead of --model",
    )
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path or URL (repeatable)")
    p.add_argument("--prompt", default="Describe the image in detail.", help="the user's question")
    p.add_argument(
        "--system", default=None, help="system prompt (default: the checkpoint's template default)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--max-num-tiles",
        type=int,
        default=None,
        help="tile budget per image (checkpoint default: 36)",
    )
    p.add_argument(
        "--num-frames", type=int, default=None, help="frames sampled per video (default 32)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from plm_core import LLM, MediaOptions, SamplingParams

    try:
        return _chat(args, LLM, MediaOptions, SamplingParams)
    except (
        ValueError
    ) as e:  # ConfigError, CheckpointError, PromptError, MediaError: the user's to fix
        print(f"error: {e}", file=sys.stderr)
        return 1


def _chat(args, LLM, MediaOptions, SamplingParams) -> int:
    model = str(demo_checkpoint(args.demo)) if args.demo else args.model
    llm = LLM(
        model,
        revision=None if args.demo else args.revision,
        device=args.device,
        dtype=args.dtype,
        max_num_tiles=args.max_num_tiles,
    )
    parts: list[dict] = []
    for url in args.image:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    for url in args.video:
        parts.append({"type": "video_url", "video_url": {"url": url}})
    if not args.image and not args.video:
        parts.append({"type": "image", "image": _demo_image()})
    parts.append({"type": "text", "text": args.prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": parts}
    ]
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens
    )
    out = llm.chat(messages, params, media_options=MediaOptions(num_frames=args.num_frames))[0]
    m = out.metrics
    print(out.text)
    print(
        f"\n[{m['prompt_tokens']} prompt tokens, {m['completion_tokens']} generated, finish_reason={out.finish_reason}, "
        f"first token {m['ttft_s']:.2f}s, total {m['e2e_s']:.2f}s]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
