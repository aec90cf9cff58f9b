"""The step-level scheduling policy (``step``), as a pure state object: no torch, no asyncio, no clock.

The unit of work is ONE denoising step of a set of rows of one latent shape (width x height). Rows
keep their own step count, guidance and scheduler state, so rows that differ only in steps or
guidance share a UNet call, a newcomer can join at a step boundary, and a row can pause (its latents
kept) and resume later; its image does not depend on its batch-mates. At every step boundary the
engine asks :meth:`StepScheduler.plan` what to do, runs it, and reports with :meth:`step_done`:

* ``drop``: rows nobody waits for (cancelled, or past their deadline): free their share now;
* ``decode``: rows that finished their last step: decode and send them;
* ``admit``: queued requests whose prompts are encoded before this step (they advance in it);
* ``advance``: the rows (one shape, at most ``max_rows``) that run one denoising step now;
* ``pause``: rows that advanced at the previous boundary and do not now (latents kept).

Every method takes ``now``; the worker shell and the simulator (simulator/engine.py) drive the same
class: ``add(request, now)``, ``cancel(id, now)``, ``plan(now) -> StepPlan``, ``step_done(rows,
seconds, now)``.

The rule: run-to-completion cohorts, made at step granularity
--------------------------------------------------------------
Measured costs make a step of r rows cost about ``a + b r`` with a small ``a`` (SDXL 1024^2 on an
H200: ~12 ms fixed and ~33 ms per image from 2 images up; compiled SDXL at 1024^2 gains only 13%
from batch 1 to 16). With costs that close to linear, advancing every row at every step is
processor sharing: the GPU does the same work per second whichever rows it advances, but every row
then finishes late. In the simulator, letting newcomers join whenever that lowered the summed
completion time of the rows at hand (rule 2b without its arrivals term) raised p95 at 90% load by
7% (SDXL) to 40% (4 GPUs), and joining wherever a place was free spread a burst's batches apart
and cost throughput. So the scheduler keeps run-to-completion's order and spends the step-level
freedom only where it pays (docs/scheduling.md has the tables, and where it still falls short):

0. **Uniform traffic is run-to-completion's.** While every row held, and every one of the last
   ``uniform_window`` arrivals, is of the normal class and of one key per shape (steps and guidance
   alike), the cohorts are run-to-completion's batches (docs/scheduling.md: what that gives and gives
   up), chosen by its own code (:class:`gpu_worker.decisions.policies.AdaptiveBatcher`, fed the
   cohorts' times): the same groups, the same order, the same holds (the plan is idle until
   ``StepPlan.wake_at`` while run-to-completion would hold an idle GPU for batch-mates), no newcomer
   joining a running cohort. Where run-to-completion stops a lone batch for a burst-mate, the mate
   joins it instead: before its first step the cohort is formed again with it, after it the mate
   joins at the next boundary (no step run twice). Rules 1-4 apply once the rows or the recent
   arrivals differ.
1. **A cohort runs to completion.** When nothing runs, the best-ranked waiting row chooses the
   shape and its cohort is every waiting row of that shape, best-ranked first, up to
   ``max_rows``, whatever their steps or guidance: one cohort where run-to-completion needs one
   batch per (steps, guidance), and rows with fewer steps leave it early. A cohort none of whose
   rows has stepped encodes its newcomers' prompts and plans again before its first step
   (``encode_first``), so a burst still landing joins it and its rows stay in step. As in
   run-to-completion's break-even hold, a shape for which waiting for one more row pays
   (``t(k) - t(k+1) + t(1)/(k+1) > 0`` on the step costs, arrivals due in time) lets another
   shape's rows of the same class go first (``break_even``). A cohort whose rows have all
   finished is decoded before the next is chosen (``decode_first``), so the next one takes the
   requests that arrived meanwhile, as run-to-completion's next batch does.
2. **A newcomer joins a running cohort** (a) while a burst lands: it arrived within ``coalesce_s``
   of the cohort's newest row; or (b) when the merge gain is positive (:meth:`_merge_gain`): what
   the merge saves of the rows' summed latencies, each raised to ``latency_power`` (2: a second
   saved for a row that has already waited long counts for more than one saved for a newcomer, as
   p95 does), over the cohort's rows, the newcomers and ``arrival_weight`` of the requests of that
   shape expected before the cohort ends (at the observed mean gap), less what the longer cohort
   adds to the latencies of the rows left waiting. A row's latency is its age now plus the seconds
   until it finishes. Without the merge, the newcomers would run with those arrivals in a fuller
   cohort when this one ends; with it, they finish sooner but the cohort's rows slow down and the
   arrivals wait for the longer cohort. Under a backlog, or where a newcomer would outlast the
   cohort while others are due, it seldom pays; with mixed step counts a short newcomer behind
   long rows usually does, unless those rows are already late.
3. **Higher priority first, with aging.** A row's class is its priority's rank (high 0, normal 1,
   low 2) less one per ``aging_lones`` lone-request times waited, never better than normal (a
   high request stays ahead; the gateway caps who may send one). A waiting row of a better class
   than every running row pauses the cohort: the better rows run as a cohort of their own, formed
   again at every boundary, with rows of worse classes only where they ride (nearly) free
   (``priority_slack``); the paused rows resume when it ends, and finished rows of a worse class
   are decoded after it.
4. **Dropped rows free their share at the next boundary**: a cancelled or expired row is left out
   of the very next step.

Rows are ranked by (class, arrival); the plan holds an idle GPU only as run-to-completion would (rule 0).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Iterable, Sequence, TypeVar

from gpu_worker.decisions.batcher import Batch, BatchPolicyConfig, Pending
from gpu_worker.decisions.policies import AdaptiveBatcher, HoldTuning
from imagegen.batch_key import BatchKey
from imagegen.protocol import priority_rank

T = TypeVar("T")

Shape = tuple[int, int]  # (width, height): rows of one shape can share a UNet call
NORMAL = priority_rank("normal")  # aging lifts a row to this class, never above it


def shape_of(key: BatchKey) -> Shape:
    return (key.width, key.height)


def unet_rows(key: BatchKey) -> int:
    """UNet rows one request occupies in a step: two with classifier-free guidance, one without."""
    return 2 if key.guidance_scale > 1.0 else 1


@dataclass(frozen=True)
class StepTuning:
    """The step policy's knobs (the defaults are what docs/scheduling.md's tables use)."""

    max_rows: int = 16  # requests advanced together in one step (MAX_BATCH_SIZE)
    coalesce_s: float = 0.02  # a burst's requests reach the worker closer together than this (rule 2a)
    encode_first: bool = True  # a cohort none of whose rows has stepped encodes newcomers, then plans again
    decode_first: bool = True  # an ended cohort is decoded before the next one is chosen
    merge: bool = True  # newcomers join a running cohort where the merge gain says so (rule 2b)
    arrival_weight: float = 0.3  # the merge gain counts this fraction of the arrivals expected meanwhile
    latency_power: float = 2.0  # the merge gain sums the rows' latencies raised to this (1: summed latency)
    uniform_as_batches: bool = True  # uniform traffic runs run-to-completion's batches (rule 0)
    uniform_window: int = 32  # ...uniform: the rows held and this many latest arrivals
    rate_alpha: float = 0.1  # weight of the newest gap between arrivals (per shape) in their moving average
    break_even: bool = True  # a new cohort that waiting for one more row would pay for yields to another shape
    aging_lones: float = 4.0  # a waiting row's class improves by one per this many lone-request times waited
    aging_s: float = 60.0  # ...or per aging_s while no step cost is known
    preempt_priority: bool = True  # a better-class row pauses a running cohort of worse ones (rule 3)
    priority_slack: float = 0.02  # worse rows ride a priority cohort while its step costs at most this much
    #                               more than its cheapest step with fewer riders
    cost_alpha: float = 0.3  # weight of the newest step time in the online step-cost model

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if self.coalesce_s < 0 or self.priority_slack < 0 or self.aging_s <= 0 or self.aging_lones <= 0:
            raise ValueError("need coalesce_s >= 0, priority_slack >= 0, aging_s > 0 and aging_lones > 0")
        if not 0 <= self.arrival_weight <= 1 or not 0 < self.rate_alpha <= 1:
            raise ValueError("need 0 <= arrival_weight <= 1 and 0 < rate_alpha <= 1")
        if not 0 < self.cost_alpha <= 1:
            raise ValueError("cost_alpha must be in (0, 1]")
        if self.latency_power < 1 or self.uniform_window < 1:
            raise ValueError("need latency_power >= 1 and uniform_window >= 1")


@dataclass(frozen=True)
class StepRequest(Generic[T]):
    """What the scheduler knows of one request; ``item`` is whatever the shell needs to run it."""

    request_id: str
    key: BatchKey
    item: T = None  # type: ignore[assignment]
    priority: str = "normal"
    owner: str = ""
    deadline_at: float | None = None  # on the scheduler's clock; None: no deadline


@dataclass
class Row(Generic[T]):
    request: StepRequest[T]
    arrived_at: float
    steps_done: int = 0
    admitted: bool = False  # its prompt is encoded and its latents exist
    finished_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def key(self) -> BatchKey:
        return self.request.key

    @property
    def steps_left(self) -> int:
        return self.key.num_inference_steps - self.steps_done


@dataclass(frozen=True)
class StepPlan:
    """What to do at one step boundary (see the module docstring), in this order on the GPU:
    forget ``drop``, decode ``decode``, encode ``admit``'s prompts, step ``advance``. ``advance`` may
    be empty while ``admit`` is not (a cohort is encoded before its first step) or ``decode`` is not
    (an ended cohort is decoded before the next is chosen). :attr:`idle`: nothing for the GPU; the
    shell plans again at the next arrival or CANCEL, or at ``wake_at`` if that comes first: rows wait
    while run-to-completion would hold its idle GPU for their batch-mates (rule 0); otherwise the plan
    never keeps an idle GPU waiting."""

    advance: tuple[str, ...] = ()
    admit: tuple[str, ...] = ()
    pause: tuple[str, ...] = ()
    drop: tuple[tuple[str, str], ...] = ()  # (request id, "cancelled" | "deadline")
    decode: tuple[str, ...] = ()
    shape: Shape | None = None
    wake_at: float | None = None  # idle while rows wait (a hold): plan again at this instant at the latest

    @property
    def idle(self) -> bool:
        """Nothing for the GPU to do (dropped rows need no GPU)."""
        return not (self.advance or self.admit or self.decode)


@dataclass
class StepCosts:
    """Seconds per denoising step by shape and UNet rows: a moving average per observed row count,
    linear between them, proportional to rows beyond them (no evidence of savings: nothing is free
    until measured)."""

    alpha: float = 0.3
    _by_shape: dict[Shape, dict[int, float]] = field(default_factory=dict)

    def observe(self, shape: Shape, rows: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        table = self._by_shape.setdefault(shape, {})
        old = table.get(rows)
        table[rows] = seconds if old is None else old + self.alpha * (seconds - old)

    def estimate_s(self, shape: Shape, rows: int) -> float | None:
        table = self._by_shape.get(shape)
        if not table:
            return None
        if rows in table:
            return table[rows]
        sizes = sorted(table)
        lo = max((s for s in sizes if s < rows), default=None)
        hi = min((s for s in sizes if s > rows), default=None)
        if lo is None or hi is None:
            nearest = hi if lo is None else lo
            return table[nearest] * rows / nearest
        return table[lo] + (rows - lo) * (table[hi] - table[lo]) / (hi - lo)


class StepScheduler(Generic[T]):
    """The ``step`` policy: decides, at every step boundary, which rows advance (module docstring)."""

    def __init__(self, tuning: StepTuning | None = None) -> None:
        self.tuning = tuning or StepTuning()
        self.costs = StepCosts(self.tuning.cost_alpha)
        self.rows: dict[str, Row[T]] = {}  # every request held: waiting, admitted, finished
        self.cohort: list[str] = []  # the rows the last plan advanced, in rank order
        self._last_admitted_at: float | None = None  # arrival of the cohort's newest row
        self._unwanted: dict[str, str] = {}  # request id -> why, dropped at the next plan
        self._ranked_at: float | None = None  # ranks computed at this instant (one plan's), by request id
        self._ranks: dict[str, tuple[float, float]] = {}
        # per shape: the latest arrival and the moving average of the gaps between arrivals
        self._arrivals: dict[Shape, tuple[float | None, float | None]] = {}
        # per shape: fewer rows than max_rows, after a step of that shape ran out of GPU memory
        self.row_limits: dict[Shape, int] = {}
        # Rule 0: run-to-completion's own choices for uniform traffic. Its queue holds the rows that
        # wait without ever having been admitted; ``_batch`` is the cohort it chose, running.
        self._batches: AdaptiveBatcher[None] = AdaptiveBatcher(
            config=BatchPolicyConfig(max_batch_size=self.tuning.max_rows), tuning=HoldTuning())
        self._batch: Batch[None] | None = None
        self._batch_started_at = 0.0
        self._batch_ended: tuple[BatchKey, int, float] | None = None  # (key, size, started at), timed next plan
        self._burst_mate = False  # a request arrived that would stop run-to-completion's lone batch
        self._recent: deque[tuple[Shape, BatchKey, str]] = deque(maxlen=self.tuning.uniform_window)

    # ------------------------------------------------------------------ what the shell reports

    @property
    def queue_depth(self) -> int:
        """Requests held that have not finished (waiting, paused or running)."""
        return sum(1 for r in self.rows.values() if r.finished_at is None)

    @property
    def running(self) -> int:
        return len(self.cohort)

    def add(self, request: StepRequest[T], now: float) -> None:
        if request.request_id in self.rows:
            raise ValueError(f"request {request.request_id!r} is already held")
        self.rows[request.request_id] = Row(request, now)
        shape = shape_of(request.key)
        last, mean = self._arrivals.get(shape, (None, None))
        if last is not None:
            gap = max(0.0, now - last)
            mean = gap if mean is None else mean + self.tuning.rate_alpha * (gap - mean)
        self._arrivals[shape] = (now if last is None else max(last, now), mean)
        self._recent.append((shape, request.key, request.priority))
        self._batches.add(request.request_id, request.key, None, now)
        if self._batch is not None and self._batches.should_preempt(self._batch, request.key, now):
            self._burst_mate = True

    def cancel(self, request_id: str, now: float) -> bool:
        """Nobody waits for the request: it is dropped at the next plan. False if it is not held."""
        if request_id not in self.rows or request_id in self._unwanted:
            return False
        self._unwanted[request_id] = "cancelled"
        return True

    def observe_step(self, shape: Shape, rows: int, seconds: float) -> None:
        """A step of ``rows`` UNet rows of ``shape`` took ``seconds`` (also a warm-up's measurement)."""
        self.costs.observe(shape, rows, seconds)

    def step_done(self, request_ids: Iterable[str], seconds: float, now: float) -> None:
        """The rows of the last plan's ``advance`` each made one step, in ``seconds`` of GPU time."""
        ids = [i for i in request_ids if i in self.rows]
        for request_id in ids:
            row = self.rows[request_id]
            row.steps_done += 1
            if row.steps_left <= 0 and row.finished_at is None:
                row.finished_at = now
        if ids:
            first = self.rows[ids[0]]
            self.observe_step(shape_of(first.key), sum(unet_rows(self.rows[i].key) for i in ids), seconds)

    def max_rows(self, shape: Shape) -> int:
        """The most requests one step of ``shape`` advances: ``max_rows``, or less after running out
        of memory at that shape."""
        return self.row_limits.get(shape, self.tuning.max_rows)

    def out_of_memory(self, request_ids: Iterable[str]) -> int | None:
        """The last plan's step of these rows ran out of GPU memory and changed nothing: steps of their
        shape take half as many rows from now on (the rows left out pause, latents kept, at the next
        plan). Returns the new limit; None for a lone row (it cannot be split: the shell fails it)."""
        ids = [i for i in request_ids if i in self.rows]
        if len(ids) <= 1:
            return None
        shape = shape_of(self.rows[ids[0]].key)
        self.row_limits[shape] = limit = max(1, min(self.max_rows(shape), len(ids)) // 2)
        return limit

    def decoded(self, request_ids: Iterable[str]) -> None:
        """Decoded (or failed): forget them."""
        for request_id in request_ids:
            self._batches.cancel(request_id)
            self.rows.pop(request_id, None)
            self._unwanted.pop(request_id, None)

    # ------------------------------------------------------------------ the rule

    def rank(self, row: Row[T], now: float) -> tuple[float, float]:
        """Lower runs first: the priority class, improved by one per aging period waited, then arrival."""
        if now != self._ranked_at:
            self._ranked_at, self._ranks = now, {}
        cached = self._ranks.get(row.request_id)
        if cached is not None:
            return cached
        self._ranks[row.request_id] = ranked = self._rank(row, now)
        return ranked

    def _rank(self, row: Row[T], now: float) -> tuple[float, float]:
        waited = max(0.0, now - row.arrived_at)
        klass = priority_rank(row.request.priority)
        aged = klass - math.floor(waited / self.aging_period_s(row.key))
        return (max(aged, min(klass, NORMAL)), row.arrived_at)

    def aging_period_s(self, key: BatchKey) -> float:
        """``aging_lones`` times the estimated time of a lone request of ``key`` (its steps at one row)."""
        step = self.step_s(shape_of(key), unet_rows(key))
        if step is None:
            return self.tuning.aging_s
        return max(1e-3, self.tuning.aging_lones * step * key.num_inference_steps)

    def step_s(self, shape: Shape, rows: int) -> float | None:
        return self.costs.estimate_s(shape, rows)

    def _rides(self, shape: Shape, lead_rows: int, rows_after: int) -> bool:
        """Whether a priority cohort whose own rows take ``lead_rows`` UNet rows may step ``rows_after``:
        its step then costs at most ``priority_slack`` more than the cheapest step with its own rows
        and fewer riders (a launch-bound GPU can make two rows cheaper than one)."""
        costs = [self.step_s(shape, rows) for rows in range(max(1, lead_rows), rows_after + 1)]
        if any(c is None for c in costs):
            return False
        return costs[-1] <= min(costs) * (1.0 + self.tuning.priority_slack)  # type: ignore[operator]

    def plan(self, now: float) -> StepPlan:
        if self._batch_ended is not None:  # a rule-0 cohort was decoded at the last boundary: time it as a batch
            key, size, started_at = self._batch_ended
            self._batches.observe_batch(key, size, now - started_at, now)
            self._batch_ended = None
        drop = self._take_drops(now)
        if self._uniform():
            return self._plan_as_batches(drop, now)
        self._batch = None  # a rule-0 cohort running goes on as a step cohort
        self._burst_mate = False
        plan = self._plan_steps(drop, now)
        for request_id in plan.admit + plan.advance:
            self._batches.cancel(request_id)  # admitted: no longer run-to-completion's to choose
        return plan

    def _take_drops(self, now: float) -> list[tuple[str, str]]:
        """Forget the cancelled rows and those past their deadline (rule 4)."""
        drop = []
        for request_id, why in list(self._unwanted.items()):
            drop.append((request_id, why))
            self.rows.pop(request_id, None)
            del self._unwanted[request_id]
        for row in list(self.rows.values()):
            deadline = row.request.deadline_at
            if row.finished_at is None and deadline is not None and deadline < now:
                drop.append((row.request_id, "deadline"))
                del self.rows[row.request_id]
        for request_id, _ in drop:
            self._batches.cancel(request_id)
        return drop

    def _uniform(self) -> bool:
        """Rule 0 applies: the rows held and the latest arrivals are all normal, one key per shape; no
        step cohort is running or paused; no shape's limit fell."""
        if not self.tuning.uniform_as_batches or self.row_limits:
            return False
        keys: dict[Shape, BatchKey] = {}
        for shape, key, priority in self._recent:
            if priority != "normal" or keys.setdefault(shape, key) != key:
                return False
        members = set(self.cohort)
        for row in self.rows.values():
            if row.finished_at is not None:
                continue
            if row.request.priority != "normal" or keys.setdefault(shape_of(row.key), row.key) != row.key:
                return False
            if row.admitted and self._batch is None and row.request_id not in self._batches:
                return False  # a step cohort's row, running or paused
            if row.admitted and self._batch is not None and row.request_id not in members \
                    and row.request_id not in self._batches:
                return False
        return True

    def _plan_as_batches(self, drop: list[tuple[str, str]], now: float) -> StepPlan:
        """Rule 0: the cohorts are run-to-completion's batches, run to their end."""
        live = [self.rows[i] for i in self.cohort if i in self.rows and self.rows[i].finished_at is None]
        finished = tuple(r.request_id for r in self.rows.values() if r.finished_at is not None)
        batch, mate, self._burst_mate = self._batch, self._burst_mate, False
        restarted = False
        if batch is not None and live and mate:
            if all(r.steps_done == 0 for r in live):
                # Stopped before its first step under run-to-completion: formed again with its burst-mates.
                self._batches.requeue(Batch(batch.key, tuple(p for p in batch.requests if p.request_id in self.rows),
                                            batch.formed_at))
                self._batch, batch, live, restarted = None, None, [], True
            else:
                # Stopped after it, run-to-completion would run the step again: the mates join it instead.
                room = self.max_rows(shape_of(batch.key)) - len(live)
                mates = [self.rows[p.request_id] for p in self._batches
                         if p.key == batch.key and p.request_id in self.rows][:room]
                for row in mates:
                    self._batches.cancel(row.request_id)
                    row.admitted = True
                self._batch = Batch(batch.key, batch.requests + tuple(self._pending(mates)), batch.formed_at)
                self.cohort = [r.request_id for r in live + mates]
                return StepPlan(tuple(self.cohort), tuple(r.request_id for r in mates), (), tuple(drop), finished,
                                shape_of(batch.key))
        if live:
            self.cohort = [r.request_id for r in live]
            return StepPlan(tuple(self.cohort), (), (), tuple(drop), finished, shape_of(live[0].key))
        if batch is not None:  # it has ended: decoded now, timed at the next plan
            if any(p.request_id in self.rows for p in batch.requests):
                self._batch_ended = (batch.key, len(batch), self._batch_started_at)
            self._batch = None
        self.cohort = []
        if finished and not restarted:
            return StepPlan(drop=tuple(drop), decode=finished)
        chosen = self._batches.next_batch(now)
        if chosen is None:
            return StepPlan(drop=tuple(drop), decode=finished, wake_at=self._batches.next_decision_at())
        self._batch, self._batch_started_at = chosen, now
        rows = [self.rows[p.request_id] for p in chosen.requests]
        admit = tuple(r.request_id for r in rows if not r.admitted)
        for row in rows:
            row.admitted = True
        self._last_admitted_at = max(r.arrived_at for r in rows)
        self.cohort = [r.request_id for r in rows]
        advance = () if admit and all(r.steps_done == 0 for r in rows) else tuple(self.cohort)
        return StepPlan(advance, admit, (), tuple(drop), finished, shape_of(rows[0].key))

    @staticmethod
    def _pending(rows: Sequence[Row[T]]) -> Iterable[Pending[None]]:
        return (Pending(r.request_id, r.key, r.arrived_at, None) for r in rows)

    def _plan_steps(self, drop: list[tuple[str, str]], now: float) -> StepPlan:
        """Rules 1-4."""
        tuning = self.tuning
        previous = [i for i in self.cohort if i in self.rows]
        live = [i for i in previous if self.rows[i].finished_at is None]
        waiting = sorted((r for r in self.rows.values() if r.finished_at is None and r.request_id not in live),
                         key=lambda r: self.rank(r, now))
        cohort: list[Row[T]] = [self.rows[i] for i in live]
        if cohort and len(cohort) > self.max_rows(shape_of(cohort[0].key)):
            # Its shape's limit fell (out of memory): the best-ranked rows go on, the others pause.
            ranked = sorted(cohort, key=lambda r: self.rank(r, now))
            kept = ranked[:self.max_rows(shape_of(cohort[0].key))]
            waiting = sorted(waiting + [r for r in cohort if r not in kept], key=lambda r: self.rank(r, now))
            cohort = [r for r in cohort if r in kept]

        if cohort and waiting and tuning.preempt_priority:
            best_waiting = self.rank(waiting[0], now)[0]
            if best_waiting < min(self.rank(r, now)[0] for r in cohort):
                waiting = sorted(waiting + cohort, key=lambda r: self.rank(r, now))
                cohort = []  # a better class waits: the cohort pauses, the better rows form their own
        if cohort and min(self.rank(r, now)[0] for r in cohort) < NORMAL:
            # A priority cohort is formed again at every boundary: riders give way to rows of its class.
            lead_class = min(self.rank(r, now)[0] for r in cohort)
            riders = [r for r in cohort if self.rank(r, now)[0] > lead_class]
            cohort = [r for r in cohort if self.rank(r, now)[0] == lead_class]
            waiting = sorted(waiting + riders, key=lambda r: self.rank(r, now))

        finished = [r for r in self.rows.values() if r.finished_at is not None]
        if not cohort and finished and self.tuning.decode_first and (
                not waiting or self.rank(waiting[0], now)[0] >= min(self.rank(r, now)[0] for r in finished)):
            # The cohort has ended: decode it first and choose the next cohort after, as
            # run-to-completion forms its next batch once the last one is done.
            self.cohort = []
            return StepPlan(drop=tuple(drop), decode=tuple(r.request_id for r in finished))
        if not cohort:
            cohort = self._new_cohort(waiting, now)
        else:
            cohort = self._grow_cohort(cohort, waiting, now)
        finished = [r for r in self.rows.values() if r.finished_at is not None]
        best_class = min((self.rank(r, now)[0] for r in cohort), default=math.inf)
        decode = tuple(r.request_id for r in finished
                       if not cohort or self.rank(r, now)[0] <= best_class)
        members = tuple(r.request_id for r in cohort)
        admit = tuple(r.request_id for r in cohort if not r.admitted)
        for row in cohort:
            if not row.admitted:
                row.admitted = True
                self._last_admitted_at = max(self._last_admitted_at or row.arrived_at, row.arrived_at)
        # A cohort none of whose rows has stepped yet only encodes its newcomers and plans again: a
        # burst still landing joins before the first step, and the rows stay in step (same GPU time).
        fresh = tuning.encode_first and admit and all(r.steps_done == 0 for r in cohort)
        advance = () if fresh else members
        pause = tuple(i for i in live if i not in members)
        self.cohort = list(members)
        shape = shape_of(cohort[0].key) if cohort else None
        return StepPlan(advance, admit, pause, tuple(drop), decode, shape)

    def _new_cohort(self, waiting: list[Row[T]], now: float) -> list[Row[T]]:
        """The best-ranked waiting row's shape; every waiting row of it up to max_rows, best first;
        rows of a worse class than the leader only while they ride free."""
        if not waiting:
            return []
        lead = self._lead(waiting, now)
        shape = shape_of(lead.key)
        lead_class = self.rank(lead, now)[0]
        self._last_admitted_at = None
        cohort: list[Row[T]] = []
        rows = lead_rows = 0
        for row in waiting:
            if len(cohort) >= self.max_rows(shape):
                break
            if shape_of(row.key) != shape:
                continue
            more = rows + unet_rows(row.key)
            if self.rank(row, now)[0] > lead_class and lead_class < NORMAL:
                if not self._rides(shape, lead_rows, more):
                    continue  # a worse row joins a priority cohort only if it rides (nearly) free
            elif self.rank(row, now)[0] == lead_class:
                lead_rows += unet_rows(row.key)
            cohort.append(row)
            rows = more
        return cohort

    def _lead(self, waiting: list[Row[T]], now: float) -> Row[T]:
        """The row whose shape the new cohort takes: the best-ranked one, unless waiting for one more
        row of its shape is expected to pay (run-to-completion's break-even rule on the step costs:
        a cohort of k waits w for row k + 1 while ``w < t(k) - t(k+1) + t(1)/(k+1)``, t the time of
        a cohort of that size, held at most ``(k+1) B - k g`` after its newest arrival at mean gap
        g) and a row of the same class and another shape waits: then that shape goes first."""
        first = waiting[0]
        if not self.tuning.break_even:
            return first
        klass = self.rank(first, now)[0]
        seen: set[Shape] = set()
        for row in waiting:
            shape = shape_of(row.key)
            if self.rank(row, now)[0] != klass:
                break
            if shape in seen:
                continue
            seen.add(shape)
            mine = [r for r in waiting if shape_of(r.key) == shape]
            if not self._worth_waiting(shape, row, mine, now):
                return row
        return first

    def _worth_waiting(self, shape: Shape, row: Row[T], mine: list[Row[T]], now: float) -> bool:
        k = len(mine)
        gap = self.mean_gap_s(shape)
        if k >= self.max_rows(shape) or gap is None:
            return False
        u = unet_rows(row.key)
        steps = row.key.num_inference_steps
        times = [self.step_s(shape, n * u) for n in (1, k, k + 1)]
        if any(t is None for t in times):
            return False
        t1, tk, tk1 = (steps * t for t in times)  # type: ignore[operator]
        wait = tk - tk1 + t1 / (k + 1)
        if wait <= 0:
            return False
        hold = min(wait, (k + 1) * wait - k * gap)
        newest = max(r.arrived_at for r in mine)
        return now < newest + hold

    def _grow_cohort(self, cohort: list[Row[T]], waiting: list[Row[T]], now: float) -> list[Row[T]]:
        """Newcomers join a running cohort only where that lowers latency (module docstring, 2)."""
        tuning = self.tuning
        shape = shape_of(cohort[0].key)
        lead_class = min(self.rank(r, now)[0] for r in cohort)
        grown = list(cohort)
        limit = self.max_rows(shape)
        candidates = [r for r in waiting if shape_of(r.key) == shape and self.rank(r, now)[0] <= lead_class]
        room = limit - len(grown)
        if not candidates or room <= 0:
            return self._add_riders(grown, waiting, lead_class, now)
        # (a) a burst landing: newcomers that arrived within coalesce_s of the cohort's newest row, or
        # any newcomer while no row of the cohort has stepped (it is still being formed)
        fresh = all(r.steps_done == 0 for r in grown)
        while candidates and len(grown) < limit and self._last_admitted_at is not None:
            row = candidates[0]
            if not fresh and (row.admitted or row.arrived_at - self._last_admitted_at > tuning.coalesce_s):
                break
            grown.append(candidates.pop(0))
            self._last_admitted_at = max(self._last_admitted_at, row.arrived_at)
        # (b) the best-ranked newcomers, as many as lower the summed completion time the most
        room = limit - len(grown)
        if not tuning.merge or not candidates:
            return self._add_riders(grown, waiting, lead_class, now)
        best, best_gain = 0, 0.0
        in_cohort = {r.request_id for r in grown}
        for w in range(1, min(room, len(candidates)) + 1):
            joining = {r.request_id for r in candidates[:w]}
            left = [r for r in waiting if r.request_id not in joining and r.request_id not in in_cohort]
            gain = self._merge_gain(grown, candidates[:w], left, now)
            if gain is not None and gain > best_gain:
                best, best_gain = w, gain
        grown += candidates[:best]
        if lead_class < NORMAL:  # a priority row also joins its class's cohort where it rides free
            rows = sum(unet_rows(r.key) for r in grown)
            for row in candidates[best:]:
                if len(grown) < limit and self._rides(shape, rows, rows + unet_rows(row.key)):
                    grown.append(row)
                    rows += unet_rows(row.key)
        return self._add_riders(grown, waiting, lead_class, now)

    def _add_riders(self, grown: list[Row[T]], waiting: list[Row[T]], lead_class: float, now: float) -> list[Row[T]]:
        """A priority cohort takes rows of worse classes (best-ranked first) while they ride free."""
        if lead_class >= NORMAL:
            return grown
        shape = shape_of(grown[0].key)
        lead_rows = rows = sum(unet_rows(r.key) for r in grown)
        for row in waiting:
            if len(grown) >= self.max_rows(shape):
                break
            more = rows + unet_rows(row.key)
            if (shape_of(row.key) == shape and row not in grown and self.rank(row, now)[0] > lead_class
                    and self._rides(shape, lead_rows, more)):
                grown.append(row)
                rows = more
        return grown

    def _finish_times(self, shape: Shape, pairs: Sequence[tuple[int, int]]) -> list[float] | None:
        """Seconds from now until each (steps left, UNet rows) pair finishes, in the pairs' own order, if
        they run as one cohort from now on, each step costing what its remaining rows cost; None: no
        cost estimate."""
        if not pairs:
            return []
        left = sorted(steps for steps, _ in pairs)
        per_row = sum(u for _, u in pairs) / len(pairs)
        t, before, done_at = 0.0, 0, {}
        for i, steps in enumerate(left):
            if steps > before:
                cost = self.step_s(shape, max(1, round(per_row * (len(left) - i))))
                if cost is None:
                    return None
                t += (steps - before) * cost
                before = steps
            done_at[steps] = t
        return [done_at[steps] for steps, _ in pairs]

    def mean_gap_s(self, shape: Shape) -> float | None:
        """The moving average of the gaps between arrivals of ``shape``; None before two arrived."""
        return self._arrivals.get(shape, (None, None))[1]

    def _merge_gain(self, cohort: list[Row[T]], newcomers: list[Row[T]], others: Sequence[Row[T]] = (),
                    now: float | None = None) -> float | None:
        """What ``newcomers`` joining the cohort now, rather than running as a cohort of their own when
        it ends, saves of the summed latencies raised to ``latency_power`` (negative: joining costs more),
        a row's latency being its age at ``now`` plus the seconds until it finishes. Over the cohort's
        rows, the newcomers and the requests expected to arrive before the cohort ends (at the observed
        mean gap, one gap apart, with the newcomers' steps): without the merge those would join the
        newcomers' cohort; with it they wait for the merged cohort's end and run on their own. The
        ``others`` rows left waiting (other shapes, or beyond the newcomers) wait as much longer as the
        merge makes the cohort. With ``latency_power`` 1 it is the summed seconds saved."""
        shape = shape_of(cohort[0].key)
        if now is None:
            now = max(r.arrived_at for r in cohort + newcomers)
        mine = [(r.steps_left, unet_rows(r.key)) for r in cohort]
        theirs = [(r.steps_left, unet_rows(r.key)) for r in newcomers]
        alone = self._finish_times(shape, mine)
        merged = self._finish_times(shape, mine + theirs)
        if not alone or merged is None:
            return None
        end, merged_end = max(alone), max(merged)
        expected = 0
        gap = self.mean_gap_s(shape) or 0.0
        if gap:
            room = self.max_rows(shape) - len(newcomers)
            expected = max(0, min(room, round(self.tuning.arrival_weight * end / max(gap, 1e-9))))
        typical = (round(sum(r.steps_left for r in newcomers) / len(newcomers)),
                   round(sum(unet_rows(r.key) for r in newcomers) / len(newcomers)))
        after = self._finish_times(shape, theirs + [typical] * expected)
        later = self._finish_times(shape, [typical] * expected)
        if after is None or later is None:
            return None
        power = self.tuning.latency_power

        def cost(latency_s: float) -> float:
            return max(0.0, latency_s) ** power

        ages = [now - r.arrived_at for r in cohort]
        newcomer_ages = [now - r.arrived_at for r in newcomers]
        arrival_ages = [-(i + 1) * gap for i in range(expected)]  # they arrive one mean gap apart
        separate = (sum(cost(a + t) for a, t in zip(ages, alone))
                    + sum(cost(a + end + t) for a, t in zip(newcomer_ages + arrival_ages, after)))
        joined = (sum(cost(a + t) for a, t in zip(ages + newcomer_ages, merged))
                  + sum(cost(a + merged_end + t) for a, t in zip(arrival_ages, later)))
        longer = sum(cost(now - r.arrived_at + merged_end) - cost(now - r.arrived_at + end) for r in others)
        return separate - joined - longer
