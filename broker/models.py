"""Several models in one cluster: which model a request goes to, and one queue per model (pure).

Every worker serves the one model it registered with (``Register.model_id``, its MODEL_ID); a
request may name one (``GenerationParams.model``). :func:`route_model` decides, from the models the
registered workers serve, which model a request is for, or why it cannot be served:

* it names a model some registered worker serves: that model;
* it names none and one model is served: that model (a one-model cluster works as before);
* it names none and several are served: refused, ``model_required``, listing them;
* it names one no registered worker serves: refused, ``unknown_model``, listing those served;
* no worker is registered at all (the cluster is starting): accepted, to wait for workers like any
  request; one that names no model is placed by these rules when the first worker registers.

The OpenAI route asks with ``GenerationParams.model_fallback``: a name no worker serves counts as no name,
so with one model served any name goes to it, as before this rule existed.

:class:`ModelQueues` holds the requests waiting in the broker, one FIFO per model, so requests for a
model whose workers are busy never hold back those for another model with idle workers; across
models it keeps the order in which they were queued (one sequence number per entry), so with one
model it is exactly the single FIFO it replaces.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator

from imagegen.protocol import FailureCode

# The refusal lists the models served; the Failure's message holds at most 4096 characters.
MAX_LISTED_CHARS = 3000


@dataclass(frozen=True)
class ModelRoute:
    """``model``: the model the request goes to (None: it names none and no worker is registered
    yet); or ``refusal``, a FailureCode, with a message for people."""

    model: str | None = None
    refusal: FailureCode | None = None
    message: str = ""


def route_model(requested: str | None, served: Iterable[str], fallback: bool = False) -> ModelRoute:
    """Which model a request naming ``requested`` (None: none) goes to, ``served`` being the models
    of the registered workers. ``fallback``: a model not served counts as none named (the OpenAI
    route, whose clients send names such as "dall-e-3"), so it goes to the one model served."""
    models = sorted(set(served))
    if not models:
        return ModelRoute(None if fallback else requested)
    if requested in models:
        return ModelRoute(requested)
    if len(models) == 1 and (requested is None or fallback):
        return ModelRoute(models[0])
    if requested is None:
        return ModelRoute(refusal=FailureCode.MODEL_REQUIRED,
                          message=f"this cluster serves several models ({models_text(models)}): "
                                  f"name one in the request's \"model\" field")
    return ModelRoute(refusal=FailureCode.UNKNOWN_MODEL,
                      message=f"no worker serves model {requested[:200]!r}; models served: {models_text(models)}")


def models_text(models: list[str]) -> str:
    """The models, comma-separated, cut short (saying how many were left out) past MAX_LISTED_CHARS."""
    shown: list[str] = []
    length = 0
    for model in models:
        length += len(model) + 2
        if length > MAX_LISTED_CHARS:
            return ", ".join(shown) + f", and {len(models) - len(shown)} more"
        shown.append(model)
    return ", ".join(shown)


class ModelQueues:
    """Request ids waiting in the broker, one FIFO per model (None: requests naming no model,
    accepted while no worker was registered).

    Iterating, ``len`` and ``in`` see all of them, in the order they were queued: ``append`` puts
    an id behind everything queued before, ``appendleft`` in front of everything (a requeued
    request keeps its place ahead of newer arrivals), each model's FIFO being a part of that order."""

    def __init__(self) -> None:
        self._queues: dict[str | None, deque[str]] = {}
        self._model_of: dict[str, str | None] = {}
        # Each id's group (None: a plain request; else its priority and owner, for broker/priorities.py),
        # each model's groups as FIFOs in the same order, and how many ids of a group not None each holds.
        self._group_of: dict[str, Hashable] = {}
        self._groups: dict[str | None, dict[Hashable, deque[str]]] = {}
        self._ranked_in: dict[str | None, int] = {}
        self._order: dict[str, int] = {}
        self._back = itertools.count()
        self._front = itertools.count(-1, -1)

    def append(self, model: str | None, request_id: str, group: Hashable = None) -> None:
        """Queue ``request_id`` last; ``group``: its priority and owner (None: a plain request)."""
        self._add(model, request_id, next(self._back), group)
        self._queues[model].append(request_id)
        self._groups[model][group].append(request_id)

    def appendleft(self, model: str | None, request_id: str, group: Hashable = None) -> None:
        self._add(model, request_id, next(self._front), group)
        self._queues[model].appendleft(request_id)
        self._groups[model][group].appendleft(request_id)

    def _add(self, model: str | None, request_id: str, order: int, group: Hashable = None) -> None:
        if request_id in self._model_of:
            raise ValueError(f"request {request_id!r} is already queued")
        self._model_of[request_id] = model
        self._order[request_id] = order
        self._queues.setdefault(model, deque())
        self._group_of[request_id] = group
        self._groups.setdefault(model, {}).setdefault(group, deque())
        if group is not None:
            self._ranked_in[model] = self._ranked_in.get(model, 0) + 1

    def has_ranked(self, model: str | None) -> bool:
        """Whether ``model``'s queue holds a request of a group other than None (a priority or an
        owner): then the next to go is chosen among :meth:`group_heads` by broker/priorities.py
        rather than taken from the head."""
        return self._ranked_in.get(model, 0) > 0

    def group_heads(self, model: str | None) -> list[str]:
        """The first id of each of ``model``'s groups, in queue order: each the longest-waiting of
        its priority and owner, so the only ones broker/priorities.py pick() needs to see."""
        return sorted((queue[0] for queue in self._groups.get(model, {}).values()), key=self._order.__getitem__)

    def remove(self, request_id: str) -> None:
        """Take a queued id out, wherever it waits; ValueError if it is not queued."""
        if request_id not in self._model_of:
            raise ValueError(f"request {request_id!r} is not queued")
        model = self._model_of.pop(request_id)
        del self._order[request_id]
        group = self._group_of.pop(request_id)
        groups = self._groups[model]
        if groups[group][0] == request_id:
            groups[group].popleft()
        else:
            groups[group].remove(request_id)
        if not groups[group]:
            del groups[group]
            if not groups:
                del self._groups[model]
        if group is not None:
            self._ranked_in[model] -= 1
            if not self._ranked_in[model]:
                del self._ranked_in[model]
        queue = self._queues[model]
        if queue[0] == request_id:
            queue.popleft()
        else:
            queue.remove(request_id)
        if not queue:
            del self._queues[model]

    def head(self, model: str | None) -> str | None:
        """The id that goes first among ``model``'s, or None when none waits."""
        queue = self._queues.get(model)
        return queue[0] if queue else None

    def popleft(self, model: str | None) -> str:
        request_id = self._queues[model][0]
        self.remove(request_id)
        return request_id

    def depth(self, model: str | None) -> int:
        return len(self._queues.get(model, ()))

    def models(self) -> list[str | None]:
        """The models with requests waiting, the one whose first request was queued first, first."""
        return sorted(self._queues, key=lambda model: self._order[self._queues[model][0]])

    def model_of(self, request_id: str) -> str | None:
        return self._model_of[request_id]

    def position(self, request_id: str) -> int:
        """1 for the id that goes first among its model's, and so on."""
        return self._queues[self._model_of[request_id]].index(request_id) + 1

    def waiting(self, model: str | None) -> list[str]:
        """``model``'s ids, the first to go first."""
        return list(self._queues.get(model, ()))

    def place(self, request_id: str, model: str) -> None:
        """``request_id`` waits under ``model`` from now on, keeping its place in the order."""
        order, group = self._order[request_id], self._group_of[request_id]
        self.remove(request_id)
        self._add(model, request_id, order, group)
        for queue in (self._queues[model], self._groups[model][group]):
            queue.insert(bisect.bisect_left(queue, order, key=self._order.__getitem__), request_id)

    def clear(self) -> None:
        self._queues.clear()
        self._model_of.clear()
        self._order.clear()
        self._group_of.clear()
        self._groups.clear()
        self._ranked_in.clear()

    def __len__(self) -> int:
        return len(self._model_of)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._model_of

    def __iter__(self) -> Iterator[str]:
        return heapq.merge(*self._queues.values(), key=self._order.__getitem__)
