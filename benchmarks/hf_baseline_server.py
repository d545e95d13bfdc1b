"""The serving benchmark's baseline: an OpenAI-style chat server running HF `generate` serially.

    .venv/bin/python benchmarks/hf_baseline_server.py --model CHECKPOINT_DIR --port 8001

What people do today without a serving engine (like `transformers serve`): HF's `AutoProcessor`
builds the prompt with `apply_chat_template`, `PerceptionLMForConditionalGeneration.generate` runs
it in fp32 with sdpa attention, and a single worker thread takes requests in arrival order, so a
request waits for every one before it. Independent of plm_core: it uses transformers, PIL and PyAV
only.

Routes: `POST /v1/chat/completions` (JSON or SSE streaming with `stream_options.include_usage`;
text, `image_url` and `video_url` parts with `data:` URLs; `max_tokens`/`max_completion_tokens`,
`temperature` (0 = greedy), `top_p`, `seed`, `ignore_eos`; `image_url.detail` "low" is HF's
single-tile "vanilla" mode, anything else "thumb+tile"; `video_url.num_frames` picks evenly spaced
frames, default 32), `GET /v1/models`, `GET /health`. Other fields, `model` included, are ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

DEFAULT_MAX_TOKENS = 512
DEFAULT_NUM_FRAMES = 32


class BadRequest(ValueError):
    """A request the baseline cannot serve; the client gets a 400 with this message."""


@dataclass
class Job:
    """One chat completion: the HF model inputs and the generation settings."""

    inputs: dict  # input_ids and pixel tensors, batch of one
    max_tokens: int
    ignore_eos: bool
    temperature: float
    top_p: float
    seed: int | None
    cancel: threading.Event  # set when the client has gone away


def requested_max_tokens(body: dict) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or value < 1:
        raise BadRequest("max_tokens must be a positive integer")
    return value


# -- request -> HF inputs --------------------------------------------------------------------------
def data_url_bytes(url: str) -> bytes:
    """The payload of a base64 `data:` URL; other schemes are refused."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest("the baseline server only accepts base64 data: URLs for media")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise BadRequest("data: URLs must be base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise BadRequest("the data: URL is not valid base64") from None


def decode_video(data: bytes, num_frames: int) -> np.ndarray:
    """Every frame decoded with PyAV, then `num_frames` evenly spaced ones kept: uint8 [T,H,W,3]."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise BadRequest(f"cannot decode the video: {e}") from None
    if not frames:
        raise BadRequest("the video has no frames")
    n = min(num_frames, len(frames))
    return np.stack([frames[i * len(frames) // n] for i in range(n)])


def hf_conversation(messages: list) -> tuple[list[dict], list[Image.Image], list[np.ndarray], str]:
    """OpenAI messages -> (HF template messages, images, videos, vision_input_type)."""
    out, images, videos, details = [], [], [], set()
    for msg in messages:
        if not isinstance(msg, dict) or "role" not in msg:
            raise BadRequest("each message needs a role and content")
        role, content = msg["role"], msg.get("content")
        if isinstance(content, str):
            # HF's PLM template drops a plain-string user message; keep it as a text part, as
            # plm-serve does.
            out.append(
                {
                    "role": role,
                    "content": content if role == "system" else [{"type": "text", "text": content}],
                }
            )
            continue
        if not isinstance(content, list):
            raise BadRequest("message content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                spec = part.get("image_url") or {}
                try:
                    images.append(
                        Image.open(io.BytesIO(data_url_bytes(spec.get("url")))).convert("RGB")
                    )
                except (OSError, Image.DecompressionBombError) as e:
                    raise BadRequest(f"cannot open the image: {e}") from None
                details.add("vanilla" if spec.get("detail") == "low" else "thumb+tile")
                parts.append({"type": "image"})
            elif kind == "video_url":
                spec = part.get("video_url") or {}
                num_frames = int(spec.get("num_frames") or DEFAULT_NUM_FRAMES)
                videos.append(decode_video(data_url_bytes(spec.get("url")), num_frames))
                parts.append({"type": "video"})
            else:
                raise BadRequest(f"unsupported content part type {kind!r}")
        out.append({"role": role, "content": parts})
    if len(details) > 1:
        raise BadRequest(
            "HF's processor takes one vision_input_type per call: mix of detail low and high"
        )
    return out, images, videos, details.pop() if details else "thumb+tile"


def build_inputs(processor, messages: list) -> dict:
    """input_ids and pixel tensors as HF's processor makes them (one BOS: the template has it)."""
    conv, images, videos, vision_input_type = hf_conversation(messages)
    text = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    media = {name: items for name, items in (("images", images), ("videos", videos)) if items}
    enc = processor(
        text=text, add_special_tokens=False, vision_input_type=vision_input_type, **media
    )
    inputs = {"input_ids": torch.tensor([enc["input_ids"][0]])}
    # Tiles of all images (frames of all videos) go in one row: HF cannot stack different tile
    # counts.
    for name, key in (("images", "pixel_values"), ("videos", "pixel_values_videos")):
        if name in media:
            inputs[key] = torch.cat([torch.as_tensor(np.asarray(p)) for p in enc[key]])[None]
    return inputs


# -- generation ------------------------------------------------------------------------------------
class TokenStreamer:
    """HF streamer handing each new token id to a callback (generate's first put is the prompt)."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.on_token(t)

    def end(self) -> None:
        pass


class Cancelled:
    """Stopping criterion that ends generation once the client has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class TextDeltas:
    """Incremental detokenisation: the text each new token adds, held back while a character is
    incomplete."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids, self.ids, self.sent = tokenizer, eos_ids, [], 0

    def add(self, token_id: int) -> str:
        if token_id in self.eos_ids:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta


class Baseline:
    """The model, its processor and the single worker thread every request goes through."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoProcessor, PerceptionLMForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(path)
        self.device = torch.device(device)
        # fp32 on CPU (bf16 matmuls are very slow there), bf16 on GPU: what plm-serve's dtype=auto
        # picks
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = (
            PerceptionLMForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa"
            )
            .to(self.device)
            .eval()
        )
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")

    def prepare(self, body: dict, cancel: threading.Event) -> Job:
        inputs = build_inputs(self.processor, body["messages"])
        inputs = {
            k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }
        temperature = body.get("temperature")
        return Job(
            inputs,
            requested_max_tokens(body),
            bool(body.get("ignore_eos")),
            1.0 if temperature is None else float(temperature),
            float(body.get("top_p") or 1.0),
            body.get("seed"),
            cancel,
        )

    @torch.inference_mode()
    def generate(self, job: Job, on_token) -> None:
        """Runs HF generate for one job, on_token(id) per new token; on the worker thread."""
        if job.seed is not None:
            torch.manual_seed(job.seed)
        sampling = (
            {"do_sample": False}
            if job.temperature == 0
            else {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
        )
        self.model.generate(
            **job.inputs,
            max_new_tokens=job.max_tokens,
            min_new_tokens=job.max_tokens if job.ignore_eos else 0,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            streamer=TokenStreamer(on_token),
            stopping_criteria=[Cancelled(job.cancel)],
            **sampling,
        )

    async def run(self, body: dict):
        """Async iterator for one request, in turn with all the others (one worker): first the
        prompt length, then each new token id. Closing it early stops the generation (or skips a
        waiting one)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done, cancel = object(), threading.Event()

        def put(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():
            try:
                if cancel.is_set():  # the client left while waiting for its turn
                    return
                job = self.prepare(body, cancel)  # preprocessing too runs on the single worker
                put(job.inputs["input_ids"].shape[1])
                self.generate(job, put)
            except Exception as e:  # noqa: BLE001 — raised again on the event loop
                put(e)
            finally:
                put(done)

        self.worker.submit(work)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()


# -- HTTP ------------------------------------------------------------------------------------------
def error_body(message: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def finish_reason(last_token: int | None, completion: int, body: dict, eos_ids: set[int]) -> str:
    if last_token in eos_ids and not body.get("ignore_eos"):
        return "stop"
    return "length" if completion >= requested_max_tokens(body) else "stop"


class Reply:
    """What one completion has produced so far."""

    def __init__(self, baseline: Baseline, model: str, n_prompt: int, body: dict):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.n_prompt, self.body, self.eos_ids = n_prompt, body, baseline.eos_ids
        self.tokenizer = baseline.processor.tokenizer
        self.deltas, self.completion, self.last = TextDeltas(self.tokenizer, self.eos_ids), 0, None

    def add(self, token_id: int) -> str:
        self.completion, self.last = self.completion + 1, token_id
        return self.deltas.add(token_id)

    def text(self) -> str:
        return self.tokenizer.decode(self.deltas.ids, skip_special_tokens=True)

    def finish(self) -> str:
        return finish_reason(self.last, self.completion, self.body, self.eos_ids)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.n_prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.n_prompt + self.completion,
        }

    def wants_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    def chunk(self, choices: list, usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.wants_usage():
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


def create_app(baseline: Baseline, served_model_name: str) -> FastAPI:
    app = FastAPI(title="HF generate baseline")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served_model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "hf-baseline",
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("messages"), list)
            or not body["messages"]
        ):
            return JSONResponse(error_body("'messages' must be a non-empty list"), status_code=400)
        tokens = baseline.run(body)
        try:  # the first item, the prompt length, comes once preprocessing succeeded
            n_prompt = await anext(tokens)
        except BadRequest as e:
            return JSONResponse(error_body(str(e)), status_code=400)
        except Exception as e:  # noqa: BLE001 — reported to the client
            return JSONResponse(
                error_body(f"generation failed: {e}", "server_error"), status_code=500
            )
        reply = Reply(baseline, served_model_name, n_prompt, body)
        if body.get("stream"):
            return StreamingResponse(_sse(tokens, reply), media_type="text/event-stream")
        try:
            async for t in tokens:
                reply.add(t)
        except Exception as e:  # noqa: BLE001
            return JSONResponse(
                error_body(f"generation failed: {e}", "server_error"), status_code=500
            )
        return {
            "id": reply.id,
            "object": "chat.completion",
            "created": reply.created,
            "model": served_model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text()},
                    "finish_reason": reply.finish(),
                    "logprobs": None,
                }
            ],
            "usage": reply.usage(),
        }

    async def _sse(tokens, reply: Reply):
        try:
            yield reply.chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            try:
                async for t in tokens:
                    text = reply.add(t)
                    if text:
                        yield reply.chunk(
                            [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
                        )
            except Exception as e:  # noqa: BLE001 — an error event, then [DONE]
                failed = error_body(f"generation failed: {e}", "server_error")
                yield f"data: {json.dumps(failed)}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield reply.chunk([{"index": 0, "delta": {}, "finish_reason": reply.finish()}])
            if reply.wants_usage():
                yield reply.chunk([], reply.usage())
            yield "data: [DONE]\n\n"
        finally:  # a client that left stops its generation
            await tokens.aclose()

    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--model",
        required=True,
        help="local PerceptionLM checkpoint directory (HF layout) or hub id",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8001, help="port to listen on")
    ap.add_argument(
        "--served-model-name",
        default=None,
        help="model name /v1/models reports (requests may name any model); default: --model",
    )
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    ap.add_argument("--log-level", default="warning", help="uvicorn log level")
    args = ap.parse_args(argv)

    app = create_app(Baseline(args.model, args.device), args.served_model_name or args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
