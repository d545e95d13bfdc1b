"""In-flight prefix sharing: which waiting requests hold back for prompt blocks being computed."""

from __future__ import annotations

from collections.abc import Sequence

from plm_core.engine.block_manager import BlockManager
from plm_core.engine.request import Request


class PrefixSharing:
    """Decides whether a waiting request waits for a prefix a running request is computing now,
    and counts what waiting saved.

    A prompt's full blocks reach the prefix cache only once computed, so requests that arrive
    together with the same image or prompt prefix would each compute it. Instead, a waiting
    request whose next uncached full block (the first one `BlockManager.cached_prefix` misses,
    by its chained content hash) is a block a running request has not computed yet waits; once
    that request has computed and cached the shared blocks, it starts with them as prefix hits.
    It waits only to gain at least one full block, holds nothing while it waits, and is re-checked
    every step, so it goes ahead on its own once nobody computes its next block (the other
    request finished, was aborted or preempted, or computed past the shared part).
    """

    def __init__(self, blocks: BlockManager):
        self.blocks = blocks
        # waiting requests that have waited for an in-flight prefix, not started since
        self.waited: set[str] = set()
        self.num_waits = 0  # requests that waited (counted once per start)
        self.shared_tokens = 0  # prompt tokens those found in the prefix cache when they started

    def waits(self, request: Request, running: Sequence[Request]) -> bool:
        """Whether the waiting `request` holds back this step for a block `running` computes."""
        if not self._computing(request, running):
            return False
        if request.request_id not in self.waited:
            self.waited.add(request.request_id)
            self.num_waits += 1
        return True

    def started(self, request: Request, hit_tokens: int) -> None:
        """A request started, with hit_tokens prompt tokens from the prefix cache."""
        if request.request_id in self.waited:
            self.waited.discard(request.request_id)
            self.shared_tokens += hit_tokens

    def forget(self, request: Request) -> None:
        """A request finished or was aborted."""
        self.waited.discard(request.request_id)

    def _computing(self, request: Request, running: Sequence[Request]) -> bool:
        """Whether the request's next uncached full block is one a running request has yet to
        compute: the same chained hash at the same index, beyond that request's computed tokens."""
        blocks = self.blocks
        if not blocks.enable_prefix_caching:
            return False
        index = len(blocks.cached_prefix(request))
        if index >= blocks.max_cached_blocks(request):
            return False  # nothing more a prefix hit could cover
        want = request.block_hashes[index]
        for other in running:
            if other.num_computed_tokens >= (index + 1) * blocks.block_size:
                continue  # computed (and cached) already, or a forked copy of it
            hashes = blocks.compute_block_hashes(other)
            if index < len(hashes) and hashes[index] == want:
                return True
        return False

    def stats(self) -> dict[str, int]:
        """Requests that waited for an in-flight prefix, and prompt tokens that saved them."""
        return {"waits": self.num_waits, "shared_tokens": self.shared_tokens}
