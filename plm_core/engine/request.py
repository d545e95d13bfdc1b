"""A request inside the engine: its tokens, media, sampling settings, progress and KV blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plm_core.inputs import MediaItem
from plm_core.sampling import SamplingParams

if TYPE_CHECKING:
    from plm_core.engine.structured_output import Grammar


class RequestStatus(enum.Enum):
    """Where a request is in its life; the finished values are OpenAI's finish reasons."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to be recomputed from scratch
    FINISHED_STOPPED = "stop"  # eos, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context is full
    FINISHED_ABORTED = "abort"  # the client went away or the engine was told to drop it

    @property
    def finished(self) -> bool:
        """True for the three finished states."""
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass
class Request:
    """One sequence being generated. `n > 1` choices are separate Requests sharing a prompt.

    Tokens [0, num_computed_tokens) have their KV in the cache; the scheduler moves
    num_computed_tokens towards num_tokens in chunks; when it reaches num_tokens the model runner
    samples the next token, which is appended to output_token_ids.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    media: list[MediaItem] = field(default_factory=list)
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # prompt tokens served from the prefix cache or forked from the leader (first admission)
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)  # the block table, owned by the BlockManager
    # hashes of full blocks of prompt + outputs, extended by the BlockManager as they fill
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    # encoder-cache entries this request holds a reference to
    encoder_keys: set[str] = field(default_factory=set)
    # n > 1: the request id of choice 0 (the leader) of the same prompt. This request waits while
    # the leader computes the prompt, then forks the leader's KV of all but the last prompt token.
    prefix_parent: str | None = None
    # scheduling_policy="priority": lower runs first, ties by arrival_time (vLLM's convention)
    priority: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    grammar: Grammar | None = None  # structured-output matcher; advanced by each appended token

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens in the prompt (media placeholders included)."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output token ids (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        """True once stopped, cut at its length or aborted."""
        return self.status.finished

    @property
    def is_prefill(self) -> bool:
        """True while the prompt (or, after preemption, prompt + outputs) is being computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    def media_in_range(self, start: int, end: int) -> list[MediaItem]:
        """Media items whose placeholder tokens overlap token positions [start, end)."""
        return [m for m in self.media if m.offset < end and m.offset + m.num_tokens > start]
