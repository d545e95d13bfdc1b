"""The server's frozen configuration (`ServerConfig`, holding the engine's `EngineConfig`) and the
`plm-serve` command line generated from both: a new option is one field here or in the engine's
config tree (plm_core/config.py), with its help text beside it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from plm_core.cli_args import HelpFormatter, add_config_options
from plm_core.cli_args import parse_config as parse_options
from plm_core.config import EngineConfig, opt


def _origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


@dataclass(frozen=True)
class ServerConfig:
    """Server: HTTP, admission, media fetching and lifecycle; it holds the engine's config."""

    engine: EngineConfig = field(default_factory=EngineConfig)

    demo: str | None = opt(
        None,
        "serve an offline random-weight demo checkpoint (tiny or bench, built once under "
        "$PLM_SERVE_CACHE or ~/.cache/plm-serve) instead of --model",
        metavar="PRESET",
        nargs="?",
        const="tiny",
    )
    served_model_name: str | None = opt(
        None, "model name clients send (default: the --model value)"
    )
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on")
    api_key: str | None = opt(
        None,
        "require 'Authorization: Bearer KEY' on every route except /health, /ready and /metrics",
    )
    max_pending_requests: int = opt(
        256, "chat requests admitted at once; more get 429 with Retry-After"
    )
    max_request_body_mb: float = opt(64.0, "larger request bodies get 413 before parsing")
    max_receiving_mb: float | None = opt(
        None,
        "request-body megabytes held at once while being received, all clients together; beyond "
        "it, 429 (default: the larger of 1024 and twice --max-request-body-mb)",
    )
    request_body_timeout: float = opt(
        30.0,
        "seconds from a request's headers until its whole body is in, else 408; no admission "
        "slot is held while a body arrives",
    )
    allowed_origins: tuple[str, ...] = opt(
        (),
        "comma-separated browser origins allowed to call the API (CORS), or '*' for any "
        "(default: none; CORS preflights then get 405)",
        parse=_origins,
        metavar="ORIGINS",
    )
    max_media_per_request: int = opt(8, "images + videos per request (checked before any decode)")
    media_ref_cache_mb: float = opt(
        512.0,
        "memory for media named by a content part's `uuid`, which later requests may send without "
        "the media (least recently used dropped first; 0 turns media by reference off)",
    )
    allowed_media_domains: tuple[str, ...] = opt(
        (),
        "comma-separated hosts (and their subdomains) http(s) media may come from (default: any)",
        parse=_origins,
        metavar="DOMAINS",
    )
    allow_private_media_hosts: bool = opt(
        False,
        "let http(s) media URLs reach loopback/private/link-local addresses (off: SSRF guard)",
    )
    max_media_mb: float = opt(32.0, "largest fetched image or video, in MiB")
    media_fetch_timeout: float = opt(10.0, "seconds to connect and read media")
    drain_timeout: float = opt(30.0, "seconds in-flight requests get to finish after SIGTERM")
    timeout_keep_alive: int = opt(
        5,
        "seconds an idle HTTP keep-alive connection stays open; behind a load balancer, set it "
        "above the balancer's idle timeout so it never reuses a connection the server just closed",
    )
    log_level: str = opt(
        "info", "log level", choices=("debug", "info", "warning", "error", "critical")
    )
    playground: bool = opt(
        True,
        "serve the browser playground at / (a chat page with images and videos, token costs "
        "from /tokenize; --no-playground turns it off)",
    )
    log_format: str = opt(
        "text",
        "text: one line per record with the request id; json: one JSON object per line (time, "
        "level, logger, message, request_id, and method, path, status, tokens, latency_ms on "
        "access lines) for log shippers",
        choices=("text", "json"),
    )
    # fault injection and a slow load, for the lifecycle tests
    debug_fail_after_steps: int | None = opt(None, "tests only", hidden=True)
    debug_load_delay: float = opt(0.0, "tests only", hidden=True)

    @property
    def model_name(self) -> str:
        """The name clients send in `model`."""
        if self.served_model_name:
            return self.served_model_name
        return f"plm-demo-{self.demo}" if self.demo else self.engine.model

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 2**20)

    @property
    def receiving_budget(self) -> int:
        """Most body bytes held while being received, all requests together; beyond it, 429."""
        if self.max_receiving_mb:
            return int(self.max_receiving_mb * 2**20)
        return max(1 << 30, 2 * self.max_body_bytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plm-serve",
        formatter_class=HelpFormatter,
        description="OpenAI-compatible HTTP server for PerceptionLM (image and video chat).",
    )
    add_config_options(parser, ServerConfig)
    return parser


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """The server's config from the command line (`plm-serve --help` lists every option)."""
    config: ServerConfig = parse_options(build_parser(), ServerConfig, argv)
    return config
