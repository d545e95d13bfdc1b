"""Media preprocessing speed: plm_core.media vs HF's PerceptionLM image processor and PyAV.

Run: python benchmarks/bench_processor.py [--media DIR] [--runs N]

--media: a folder of photos and videos (every image and video file in it is measured); by default
../shared/media beside the repository where it exists, else a few generated photos and a generated
clip (seeded, written once under benchmarks/out/media).

(a) per image: our decode-free path (PIL image -> pixels) vs
    `PerceptionLMImageProcessor()(images=[pil], return_tensors="pt")` plus the tile counting HF's
    processor does for the prompt; pixels asserted equal.
(b) per video: `decode_video_frames(num_frames=32)` vs decoding every frame with PyAV, converting
    each to RGB and indexing, and vs HF's own PyAV reader (decodes up to the last sampled frame,
    converts only the sampled ones); frames asserted equal.
Times are medians of --runs runs after one warm-up run; the machine's load makes single runs noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plm_core.media import video as video_ops  # noqa: E402
from plm_core.media.containers import ContainerSource, probe_video  # noqa: E402
from plm_core.media.preprocess import preprocess_image  # noqa: E402
from plm_core.media.rgb import pil_to_rgb_tensor  # noqa: E402
from plm_core.media.sampling import sample_frame_indices  # noqa: E402
from plm_core.media.settings import FrameSampling  # noqa: E402
from plm_core.media.tiling import num_image_tiles  # noqa: E402

DEFAULT_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
GENERATED_MEDIA = Path(__file__).resolve().parent / "out" / "media"


def generated_media() -> Path:
    """Three photo-like JPEGs (phone, square, panorama) and a 300-frame clip, made once."""
    from serve_bench import synthetic_video
    from serve_photos import jpeg_bytes, photo_pixels

    folder = GENERATED_MEDIA
    if not (folder / "clip.mp4").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for name, (w, h) in {
            "phone": (4032, 3024),
            "square": (1024, 1024),
            "pano": (3000, 900),
        }.items():
            (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photo_pixels(rng, w, h)))
        (folder / "clip.tmp").write_bytes(synthetic_video(rng, 300))
        (folder / "clip.tmp").rename(folder / "clip.mp4")
    return folder


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_token_count(pixel_values: torch.Tensor, patch_size: int = 14, pooling_ratio: int = 2) -> int:
    """PerceptionLMProcessor.replace_image_token's count: it needs the pixels (a numpy view)."""
    from transformers.image_utils import get_image_size, to_numpy_array

    media = pixel_values[0]
    height, width = get_image_size(to_numpy_array(media))
    grid = (height // patch_size // pooling_ratio) * (width // patch_size // pooling_ratio)
    return grid * media.shape[0]


def bench_images(media: Path, runs: int) -> None:
    from transformers import PerceptionLMImageProcessor

    hf = PerceptionLMImageProcessor()
    print("(a) images: PIL image -> pixel_values [N, 3, 448, 448] (max_num_tiles=36)")
    print(
        f"{'image':28s} {'size':>10s} {'tiles':>5s} {'HF ms':>8s} {'HF+count':>9s} "
        f"{'ours ms':>8s} {'speedup':>8s}"
    )
    for path in sorted(p for p in media.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        bench_image(hf, path, runs)


def bench_image(hf, path: Path, runs: int) -> None:
    """One row of (a): pixels checked against HF's, then the three timings."""
    pil = Image.open(path)
    pil.load()
    ref = hf(images=[pil], return_tensors="pt")["pixel_values"]
    ours = preprocess_image(pil_to_rgb_tensor(pil))
    assert torch.equal(ours, ref[0]), f"{path.name}: pixels differ from HF"
    n = num_image_tiles(*pil.size, tile_size=448, max_num_tiles=36)
    assert n == ref.shape[1] and hf_token_count(ref) == 256 * n

    def hf_run():
        return hf(images=[pil], return_tensors="pt")["pixel_values"]

    def hf_with_count():
        hf_token_count(hf_run())

    def ours_run():
        num_image_tiles(*pil.size, tile_size=448, max_num_tiles=36)
        return preprocess_image(pil_to_rgb_tensor(pil))

    t_hf = median_time(hf_run, runs)
    t_hf_count = median_time(hf_with_count, runs)
    t_ours = median_time(ours_run, runs)
    size = f"{pil.width}x{pil.height}"
    print(
        f"{path.name:28s} {size:>10s} {n:5d} {t_hf * 1e3:8.1f} {t_hf_count * 1e3:9.1f} "
        f"{t_ours * 1e3:8.1f} {t_hf / t_ours:7.2f}x"
    )


def bench_videos(media: Path, runs: int) -> None:
    print("\n(b) videos: 32 sampled frames -> uint8 [32, 3, H, W]")
    print(
        f"{'video':20s} {'frames':>6s} {'all+index ms':>13s} {'HF reader ms':>13s} {'ours ms':>8s} "
        f"{'vs all':>7s} {'vs HF':>7s}  decoded/seeks"
    )
    for path in sorted(p for p in media.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        bench_video(path, runs)


def bench_video(path: Path, runs: int) -> None:
    """One row of (b): frames checked against a full decode and HF's reader, then the timings."""
    import av
    from transformers.video_utils import read_video_pyav

    data = path.read_bytes()
    info = probe_video(data)
    indices = sample_frame_indices(info.num_frames, num_frames=32)

    def decode_all_then_index():
        container = av.open(str(path))
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        container.close()
        return np.stack([frames[i] for i in indices])

    def hf_reader():
        video, _ = read_video_pyav(
            str(path), sample_indices_fn=lambda metadata, **kw: np.array(indices)
        )
        return video

    def ours():
        return video_ops.decode_video_frames(data, FrameSampling(num_frames=32))[0]

    ref = torch.from_numpy(decode_all_then_index()).permute(0, 3, 1, 2)
    assert torch.equal(ours(), ref), f"{path.name}: frames differ from a full decode"
    assert torch.equal(torch.from_numpy(hf_reader()).permute(0, 3, 1, 2), ref)
    _, stats = video_ops.decode_indices(ContainerSource(data), indices)
    t_all = median_time(decode_all_then_index, runs)
    t_hf = median_time(hf_reader, runs)
    t_ours = median_time(ours, runs)
    print(
        f"{path.name:20s} {info.num_frames:6d} {t_all * 1e3:13.1f} {t_hf * 1e3:13.1f} "
        f"{t_ours * 1e3:8.1f} {t_all / t_ours:6.2f}x {t_hf / t_ours:6.2f}x  "
        f"{stats.decoded}/{stats.seeks} ({stats.mode})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=Path, help="default: ../shared/media, else generated")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--skip-videos", action="store_true")
    args = parser.parse_args()
    if args.media is None:
        args.media = DEFAULT_MEDIA if DEFAULT_MEDIA.is_dir() else generated_media()
    if not args.media.is_dir():
        sys.exit(f"media folder not found: {args.media}")
    print(f"media: {args.media}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if not args.skip_images:
        bench_images(args.media, args.runs)
    if not args.skip_videos:
        bench_videos(args.media, args.runs)


if __name__ == "__main__":
    main()
