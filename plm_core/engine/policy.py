"""Scheduling policies: the order waiting requests start in, and which running request yields.

A policy is two decisions behind one seam (as vLLM's `SchedulingPolicy` and request queues): its
`RequestQueue` orders the waiting requests, and `victim` picks the running request to preempt when
KV blocks run out. `fcfs` is arrival order; `priority` is `Request.priority` (lower first), ties by
`Request.arrival_time`, then by the order requests reached the queue. The scheduler may pass over
a queued request that waits for a prefix another request is computing; it keeps its place.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence

from plm_core.engine.request import Request


class RequestQueue(ABC):
    """The waiting requests, in the order they are admitted (the first is admitted next)."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """Queues a new request."""

    @abstractmethod
    def requeue(self, request: Request) -> None:
        """Queues a request that was preempted (it waits to be recomputed)."""

    @abstractmethod
    def peek(self) -> Request:
        """The request admitted next; IndexError if empty."""

    @abstractmethod
    def pop(self) -> Request:
        """Removes and returns the request admitted next; IndexError if empty."""

    @abstractmethod
    def remove(self, request: Request) -> bool:
        """Removes the request if queued; whether it was."""

    @abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """The queued requests in admission order."""

    @abstractmethod
    def __len__(self) -> int: ...

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSQueue(RequestQueue):
    """Arrival order; a preempted request goes back to the front (it arrived before the rest)."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> bool:
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        return True

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)


def priority_key(request: Request) -> tuple[int, float]:
    """The priority policy's order: lower `priority` first, then earlier `arrival_time`."""
    return request.priority, request.arrival_time


class PriorityQueue(RequestQueue):
    """Sorted by `priority_key`; equal keys keep the order they were queued in."""

    def __init__(self) -> None:
        self._queue: list[Request] = []

    def add(self, request: Request) -> None:
        bisect.insort_right(self._queue, request, key=priority_key)

    def requeue(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.pop(0)

    def remove(self, request: Request) -> bool:
        for i, queued in enumerate(self._queue):
            if queued is request:
                del self._queue[i]
                return True
        return False

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)


class SchedulingPolicy(ABC):
    """Admission order (the waiting queue it makes) and the preemption victim."""

    name: str

    @abstractmethod
    def new_queue(self) -> RequestQueue:
        """An empty waiting queue ordered by this policy."""

    @abstractmethod
    def victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt when KV blocks run out (`running` in admission order)."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: the latest-admitted running request yields."""

    name = "fcfs"

    def new_queue(self) -> RequestQueue:
        return FCFSQueue()

    def victim(self, running: Sequence[Request]) -> Request:
        return running[-1]


class PriorityPolicy(SchedulingPolicy):
    """Lower `Request.priority` first; the running request with the largest (priority, arrival)
    yields, the latest admitted among equals."""

    name = "priority"

    def new_queue(self) -> RequestQueue:
        return PriorityQueue()

    def victim(self, running: Sequence[Request]) -> Request:
        return max(reversed(running), key=priority_key)


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}


def make_policy(name: str) -> SchedulingPolicy:
    """The policy `SchedulerConfig.scheduling_policy` names; ValueError for an unknown name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {name!r}; choose from {', '.join(POLICIES)}"
        ) from None
