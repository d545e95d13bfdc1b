"""`plm-serve` / `python -m server`: load a PerceptionLM checkpoint and serve the OpenAI chat API over HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from plm_core.config import DEFAULT_MAX_IMAGE_PIXELS, EngineConfig
from plm_core.media.image import DEFAULT_MAX_IMAGE_SIDE
from plm_core.media.video import DEFAULT_MAX_DECODED_PIXELS

log = logging.getLogger("plm_serve")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(
        prog="plm-serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="OpenAI-compatible HTTP server for PerceptionLM (image and video chat).",
    )
    p.add_argument("--model", default=d.model, help="hub id or local checkpoint directory")
    p.add_argument(
        "--demo",
        nargs="?",
        const="tiny",
        default=None,
        metavar="PRESET",
        help="serve an offline random-weight demo checkpoint (tiny or bench, built once under "
        "$PLM_SERVE_CACHE or ~/.cache/plm-serve) instead of --model",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model name clients send; None means the --model value",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default=d.dtype,
        help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences running at once"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help="tokens per engine step (prefill chunks + decodes)",
    )
    p.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=None,
        help="KV cache size (default: 2 GiB on CPU; on a GPU what --gpu-memory-utilization leaves)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=d.gpu_memory_utilization,
        help="share of the GPU's memory this server may take: weights, a measured worst-case step's "
        "activations, the encoder cache and the KV cache (the rest)",
    )
    p.add_argument(
        "--max-encoder-tiles-per-step",
        type=int,
        default=d.max_encoder_tiles_per_step,
        help="image tiles / video frames through the vision encoder per engine step (larger items "
        "span several steps)",
    )
    p.add_argument(
        "--encoder-cache-tokens",
        type=int,
        default=None,
        help="vision-encoder cache budget in LM tokens (default: max(65536, 2 x max-model-len))",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay decode steps as CUDA graphs, bucketed by batch and context (GPU; opt-in)",
    )
    p.add_argument(
        "--max-num-tiles",
        type=int,
        default=None,
        help="default tile budget per image (model default 36)",
    )
    p.add_argument(
        "--default-num-frames",
        type=int,
        default=d.default_num_frames,
        help="frames sampled per video",
    )
    p.add_argument(
        "--max-num-frames",
        type=int,
        default=d.max_num_frames,
        help="ceiling on frames per video; requests asking for more (num_frames or fps) get this many",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="largest image (width x height, read from the header before decoding); also per video frame",
    )
    p.add_argument(
        "--max-video-duration",
        type=float,
        default=3600.0,
        help="longest video in seconds (read from the container before decoding); 0 = no limit",
    )
    p.add_argument(
        "--max-image-side",
        type=int,
        default=DEFAULT_MAX_IMAGE_SIDE,
        help="longest side in pixels of an image or video frame (read from the header before decoding)",
    )
    p.add_argument(
        "--max-video-pixels",
        type=int,
        default=DEFAULT_MAX_DECODED_PIXELS,
        help="frames x width x height decoded per video, checked from the container before decoding "
        "(32 frames of 4K fit); larger requests are refused, asking for fewer frames",
    )
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="directory whose files clients may send as file:// URLs (default: none allowed)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route except /health, /ready and /metrics",
    )
    p.add_argument(
        "--max-pending-requests",
        type=int,
        default=256,
        help="chat requests admitted at once; more get 429 with Retry-After",
    )
    p.add_argument(
        "--max-request-body-mb",
        type=float,
        default=64.0,
        help="larger request bodies get 413 before parsing",
    )
    p.add_argument(
        "--max-receiving-mb",
        type=float,
        default=None,
        help="request-body megabytes held at once while being received, all clients together; beyond "
        "it, 429 (default: the larger of 1024 and twice --max-request-body-mb)",
    )
    p.add_argument(
        "--request-body-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send its whole request body, else 408; no admission slot is "
        "held while a body arrives",
    )
    p.add_argument(
        "--allowed-origins",
        default=None,
        help="comma-separated browser origins allowed to call the API (CORS), or '*' for any "
        "(default: none; CORS preflights then get 405)",
    )
    p.add_argument(
        "--max-media-per-request",
        type=int,
        default=8,
        help="images + videos per request (checked before any decode)",
    )
    p.add_argument(
        "--allowed-media-domains",
        default=None,
        help="comma-separated hosts (and their subdomains) http(s) media may come from (default: any)",
    )
    p.add_argument(
        "--allow-private-media-hosts",
        action="store_true",
        help="let http(s) media URLs reach loopback/private/link-local addresses (off: SSRF guard)",
    )
    p.add_argument(
        "--max-media-mb", type=float, default=32.0, help="largest fetched image or video"
    )
    p.add_argument(
        "--media-fetch-timeout", type=float, default=10.0, help="seconds to connect and read media"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    p.add_argument(
        "--debug-fail-after-steps", type=int, default=None, help=argparse.SUPPRESS
    )  # tests only
    p.add_argument(
        "--debug-load-delay", type=float, default=0.0, help=argparse.SUPPRESS
    )  # tests only
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from plm_core.checkpoint import CheckpointError
    from plm_core.config import ConfigError
    from server.app import ServerState, build_app
    from server.media_fetch import MediaFetcher

    name = args.served_model_name or (args.model if not args.demo else f"plm-demo-{args.demo}")
    state = ServerState(
        served_model_name=name,
        api_key=args.api_key,
        max_pending=args.max_pending_requests,
        max_body_bytes=int(args.max_request_body_mb * 2**20),
        max_media_items=args.max_media_per_request,
        body_timeout_s=args.request_body_timeout,
        max_receiving_bytes=int(args.max_receiving_mb * 2**20) if args.max_receiving_mb else None,
        allowed_origins=tuple(
            o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()
        ),
        fetcher=MediaFetcher(
            max_bytes=int(args.max_media_mb * 2**20),
            timeout_s=args.media_fetch_timeout,
            allow_private=args.allow_private_media_hosts,
            allowed_domains=[
                d.strip() for d in (args.allowed_media_domains or "").split(",") if d.strip()
            ],
        ),
    )
    config = uvicorn.Config(
        build_app(state),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=args.drain_timeout,
    )

    class DrainingServer(uvicorn.Server):
        def handle_exit(
            self, sig, frame
        ):  # SIGTERM/SIGINT: readiness goes 503, in-flight requests finish
            state.draining = True
            super().handle_exit(sig, frame)
            # stop accepting at once, not at uvicorn's next 0.1 s tick: a balancer's new connection is
            # then refused (and retried elsewhere) instead of getting a 503 it would not retry
            loop = getattr(self, "_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(self._close_listeners)

        def _close_listeners(self):
            for listener in getattr(self, "servers", []):
                listener.close()

        async def serve(self, sockets=None):
            import asyncio

            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

    server = DrainingServer(config)
    load_failed: list[BaseException] = []

    def load() -> None:  # in a thread, so /health answers and /ready says "loading" meanwhile
        try:
            llm, engine = _load_engine(args)
        except BaseException as e:  # noqa: BLE001 - any load failure ends the process with a message
            load_failed.append(e)
            if isinstance(e, (ConfigError, CheckpointError, ValueError)):
                print(f"error: {e}", file=sys.stderr)
            else:
                log.exception("loading the model failed")
            server.should_exit = True
            return
        engine.on_dead = lambda: setattr(server, "should_exit", True)  # an orchestrator restarts us
        state.llm, state.engine = llm, engine  # the engine last: from here on /ready is 200
        log.info(
            "serving %s as '%s' on %s (%s); KV cache %d tokens; max_model_len %d; http://%s:%d",
            llm.engine_config.model,
            name,
            llm.device,
            llm.dtype,
            llm.engine.kv_capacity_tokens,
            llm.max_model_len,
            args.host,
            args.port,
        )

    threading.Thread(target=load, name="plm-load", daemon=True).start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.shutdown()
    if load_failed:
        return 1
    if state.engine is not None and state.engine.dead is not None:
        log.error("exiting because the engine failed: %r", state.engine.dead)
        return 1
    return 0


def _load_engine(args):
    """Builds the demo checkpoint if asked, loads the model and starts the engine thread."""
    from pathlib import Path

    from plm_core.engine.async_engine import AsyncEngine
    from plm_core.llm import LLM
    from plm_core.processor import MediaLimits

    if args.debug_load_delay:  # lets the tests watch the loading state
        import time

        time.sleep(args.debug_load_delay)
    model = args.model
    if args.demo:
        from plm_core.__main__ import demo_checkpoint

        model = str(demo_checkpoint(args.demo))
    local = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    limits = MediaLimits(
        max_video_frames=args.max_num_frames,
        allowed_local_root=local,
        allow_local_files=local is not None,
        max_image_pixels=args.max_image_pixels,
        max_video_duration_s=args.max_video_duration or None,
        max_image_side=args.max_image_side,
        max_video_decoded_pixels=args.max_video_pixels,
    )
    llm = LLM(
        model,
        limits=limits,
        revision=None if args.demo else args.revision,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        max_num_tiles=args.max_num_tiles,
        cuda_graphs=args.cuda_graphs,
        max_encoder_tiles_per_step=args.max_encoder_tiles_per_step,
        encoder_cache_tokens=args.encoder_cache_tokens,
        default_num_frames=args.default_num_frames,
        max_num_frames=args.max_num_frames,
    )
    if args.debug_fail_after_steps is not None:  # fault injection for the engine-failure tests
        _fail_after(llm.engine, args.debug_fail_after_steps)
    return llm, AsyncEngine(llm.engine)


def _fail_after(core, steps: int) -> None:
    step = core.step
    count = [0]

    def failing_step():
        count[0] += 1
        if count[0] > steps:
            raise RuntimeError("injected engine failure (--debug-fail-after-steps)")
        return step()

    core.step = failing_step


if __name__ == "__main__":
    sys.exit(main())
