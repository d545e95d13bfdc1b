"""What the routes share: the frozen config, the engine once loaded, the live admission counters,
the turns at receiving bodies, the metrics, the media fetcher and the pool that compiles output
constraints."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from plm_core.engine.async_engine import AsyncEngine
from server.config import ServerConfig
from server.media_fetch import MediaFetcher
from server.media_refs import MediaRefs
from server.metrics import Metrics
from server.upload_turns import UploadTurns


@dataclass
class Admission:
    """Live counters of the HTTP layer (changed only on the event loop)."""

    pending: int = 0  # chat requests admitted: preprocessing, waiting or running
    receiving_bytes: int = 0  # bytes of request bodies being received right now (not yet parsed)
    draining: bool = False  # SIGTERM received: not ready, in-flight requests finish


class ServerState:
    """The server's shared objects. `engine` stays None while the model loads (the server already
    answers /health, and /ready says "loading"); setting it is what makes the server ready."""

    def __init__(self, config: ServerConfig | None = None):
        self.config = config = config or ServerConfig()
        self.engine: AsyncEngine | None = None
        self.live = Admission()
        self.uploads = UploadTurns()  # request bodies are read a few at a time
        self.metrics = Metrics(self)
        self.fetcher = MediaFetcher(
            max_bytes=int(config.max_media_mb * 2**20),
            timeout_s=config.media_fetch_timeout,
            allow_private=config.allow_private_media_hosts,
            allowed_domains=list(config.allowed_media_domains),
        )
        self.media_refs = MediaRefs(int(config.media_ref_cache_mb * 2**20))
        # output constraints compile here, apart from media preprocessing, so slow ones delay
        # only each other
        self.grammar_pool = ThreadPoolExecutor(2, thread_name_prefix="plm-grammar")

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    @property
    def not_ready_reason(self) -> str | None:
        if self.live.draining:
            return "draining"
        if self.engine is None:
            return "loading"
        if self.engine.dead is not None:
            return "engine failed"
        return None
