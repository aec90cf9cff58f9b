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
then finishes late. So the scheduler keeps the order run-to-completion has and spends the
step-level freedom only where it lowers latency (docs/scheduling.md has the simulated results,
including where it still falls short):

1. **A cohort runs to completion.** When nothing runs, the best-ranked waiting row chooses the
   shape; its cohort is every waiting row of that shape, best-ranked first, up to ``max_rows``,
   whatever their steps or guidance (run-to-completion cannot group those; this is where mixed
   step counts and guidance scales gain: one cohort instead of several batches).
2. **A newcomer joins a running cohort** (a) while a burst lands (it arrived within
   ``coalesce_s`` of the cohort's newest row: run-to-completion restarts its lone batch for this;
   here the newcomer joins at the next boundary and nothing is lost), or (b) when joining lowers
   the summed completion time of the cohort's rows and the newcomers (:meth:`_merge_gain`, from
   the learned step costs: with near-linear costs it seldom does) and, with
   ``merge_only_emptying``, leaves nothing waiting: under a backlog finishing in order wins.
3. **Higher priority first, with aging.** A row's class is its priority's rank (high 0, normal 1,
   low 2) less one for every ``aging_lones`` lone-request times it has waited, never better than
   normal (a high request stays ahead; the gateway caps who may send one). A waiting row of a
   better class than every row of the cohort pauses the cohort: the better rows run as a cohort
   of their own, with worse rows only where they ride (nearly) free (``priority_slack``), and the
   paused rows resume when it ends. Finished rows of a worse class are decoded after it.
4. **Dropped rows free their share at the next boundary**: a cancelled or expired row is left out
   of the very next step.

Rows are ranked by (class, arrival); the plan never holds an idle GPU (no window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generic, Iterable, TypeVar

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
    coalesce_s: float = 0.02  # a burst's requests reach the worker closer together than this
    free_tolerance: float = 0.02  # one more row is "free" if the step costs at most this much more
    priority_slack: float = 0.02  # rows of a worse class ride a priority cohort while its steps cost this much more
    merge_only_emptying: bool = True  # newcomers join by (b) only if that leaves nothing waiting
    aging_lones: float = 4.0  # a waiting row's class improves by one per this many lone-request times waited
    aging_s: float = 60.0  # ...or per aging_s while no step cost is known
    preempt_priority: bool = True  # a better-class row pauses a running cohort of worse ones
    cost_alpha: float = 0.3  # weight of the newest step time in the online step-cost model

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if self.coalesce_s < 0 or self.free_tolerance < 0 or self.aging_s <= 0:
            raise ValueError("need coalesce_s >= 0, free_tolerance >= 0 and aging_s > 0")
        if not 0 < self.cost_alpha <= 1:
            raise ValueError("cost_alpha must be in (0, 1]")


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
    """What to do at one step boundary (see the module docstring). Empty ``advance``: the GPU has
    nothing to step; ``wake_at`` is when the plan can next change without an arrival (None: only an
    arrival changes it)."""

    advance: tuple[str, ...] = ()
    admit: tuple[str, ...] = ()
    pause: tuple[str, ...] = ()
    drop: tuple[tuple[str, str], ...] = ()  # (request id, "cancelled" | "deadline")
    decode: tuple[str, ...] = ()
    shape: Shape | None = None
    wake_at: float | None = None

    @property
    def idle(self) -> bool:
        return not (self.advance or self.decode or self.drop)


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
        self.cohort_places = 0  # rows the cohort started with (refill keeps it there)
        self._last_admitted_at: float | None = None  # arrival of the cohort's newest row
        self._unwanted: dict[str, str] = {}  # request id -> why, dropped at the next plan

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

    def decoded(self, request_ids: Iterable[str]) -> None:
        """Decoded (or failed): forget them."""
        for request_id in request_ids:
            self.rows.pop(request_id, None)
            self._unwanted.pop(request_id, None)

    # ------------------------------------------------------------------ the rule

    def rank(self, row: Row[T], now: float) -> tuple[float, float]:
        """Lower runs first: the priority class, improved by one per aging period waited, then arrival."""
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

    def _free(self, shape: Shape, rows_now: int, rows_after: int) -> bool:
        """Whether a step of ``rows_after`` UNet rows costs at most free_tolerance more than one of ``rows_now``."""
        if rows_now <= 0:
            return True
        now_s, after_s = self.step_s(shape, rows_now), self.step_s(shape, rows_after)
        if now_s is None or after_s is None:
            return False
        return after_s <= now_s * (1.0 + self.tuning.free_tolerance)

    def plan(self, now: float) -> StepPlan:
        tuning = self.tuning
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
        previous = [i for i in self.cohort if i in self.rows]
        live = [i for i in previous if self.rows[i].finished_at is None]
        waiting = sorted((r for r in self.rows.values() if r.finished_at is None and r.request_id not in live),
                         key=lambda r: self.rank(r, now))
        cohort: list[Row[T]] = [self.rows[i] for i in live]

        if cohort and waiting and tuning.preempt_priority:
            best_waiting = self.rank(waiting[0], now)[0]
            if best_waiting < min(self.rank(r, now)[0] for r in cohort):
                waiting = sorted(waiting + cohort, key=lambda r: self.rank(r, now))
                cohort = []  # a better class waits: the cohort pauses, the better rows form their own

        if not cohort:
            cohort = self._new_cohort(waiting, now)
            self.cohort_places = len(cohort)
        else:
            cohort = self._grow_cohort(cohort, waiting, now)
        finished = [r for r in self.rows.values() if r.finished_at is not None]
        best_class = min((self.rank(r, now)[0] for r in cohort), default=math.inf)
        decode = tuple(r.request_id for r in finished
                       if not cohort or self.rank(r, now)[0] <= best_class)
        advance = tuple(r.request_id for r in cohort)
        admit = tuple(r.request_id for r in cohort if not r.admitted)
        for row in cohort:
            if not row.admitted:
                row.admitted = True
                self._last_admitted_at = max(self._last_admitted_at or row.arrived_at, row.arrived_at)
        pause = tuple(i for i in live if i not in advance)
        self.cohort = list(advance)
        shape = shape_of(cohort[0].key) if cohort else None
        wake_at = None
        if not cohort and any(r.finished_at is None for r in self.rows.values()):
            wake_at = None  # rows wait only when nothing can run: cannot happen without a cohort
        return StepPlan(advance, admit, pause, tuple(drop), decode, shape, wake_at)

    def _new_cohort(self, waiting: list[Row[T]], now: float) -> list[Row[T]]:
        """The best-ranked waiting row's shape; every waiting row of it up to max_rows, best first;
        rows of a worse class than the leader only while they ride free."""
        if not waiting:
            return []
        lead = waiting[0]
        shape = shape_of(lead.key)
        lead_class = self.rank(lead, now)[0]
        cohort: list[Row[T]] = []
        rows = lead_rows = 0
        for row in waiting:
            if len(cohort) >= self.tuning.max_rows:
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
        if len(cohort) == 1 and not lead.admitted:
            self._last_admitted_at = None
        return cohort

    def _grow_cohort(self, cohort: list[Row[T]], waiting: list[Row[T]], now: float) -> list[Row[T]]:
        """Newcomers join a running cohort only where that lowers latency (module docstring, 2)."""
        tuning = self.tuning
        shape = shape_of(cohort[0].key)
        lead_class = min(self.rank(r, now)[0] for r in cohort)
        grown = list(cohort)
        candidates = [r for r in waiting if shape_of(r.key) == shape and self.rank(r, now)[0] <= lead_class]
        room = tuning.max_rows - len(grown)
        if room > 0 and lead_class < NORMAL:  # a priority cohort: worse rows ride only where it is free
            rows = sum(unet_rows(r.key) for r in grown)
            lead_rows = sum(unet_rows(r.key) for r in grown if self.rank(r, now)[0] == lead_class)
            for row in waiting:
                if len(grown) >= tuning.max_rows:
                    break
                more = rows + unet_rows(row.key)
                if shape_of(row.key) == shape and row not in candidates and self._rides(shape, lead_rows, more):
                    grown.append(row)
                    rows = more
            room = tuning.max_rows - len(grown)
        if not candidates or room <= 0:
            return grown
        # (a) a burst landing: newcomers that arrived within coalesce_s of the cohort's newest row
        while candidates and len(grown) < tuning.max_rows and self._last_admitted_at is not None:
            row = candidates[0]
            if row.admitted or row.arrived_at - self._last_admitted_at > tuning.coalesce_s:
                break
            grown.append(candidates.pop(0))
            self._last_admitted_at = max(self._last_admitted_at, row.arrived_at)
        # (b) the best-ranked newcomers, as many as lower the summed completion time the most
        room = tuning.max_rows - len(grown)
        if tuning.merge_only_emptying and (len(candidates) > room or len(candidates) < len(waiting)):
            return grown  # rows would still wait after it: a backlog, where finishing in order wins
        best, best_gain = 0, 0.0
        for w in range(1, min(room, len(candidates)) + 1):
            gain = self._merge_gain(grown, candidates[:w])
            if gain is not None and gain > best_gain:
                best, best_gain = w, gain
        grown += candidates[:best]
        return grown

    def _finish_times(self, shape: Shape, rows: list[Row[T]]) -> list[float] | None:
        """Seconds from now until each row (by steps left, ascending) finishes if ``rows`` run as one
        cohort from now on, each step costing what its remaining rows cost; None: no cost estimate."""
        left = sorted(r.steps_left for r in rows)
        per_row = sum(unet_rows(r.key) for r in rows) / len(rows)
        t, before, out = 0.0, 0, []
        for i, steps in enumerate(left):
            if steps > before:
                cost = self.step_s(shape, max(1, round(per_row * (len(left) - i))))
                if cost is None:
                    return None
                t += (steps - before) * cost
                before = steps
            out.append(t)
        return out

    def _merge_gain(self, cohort: list[Row[T]], newcomers: list[Row[T]]) -> float | None:
        """Summed seconds the rows save if ``newcomers`` join the cohort now rather than run as a
        cohort of their own when it ends (negative: joining costs more). It counts only these rows,
        and counts the cohort's rows as delayed by the extra cost of its steps: a step of near-linear
        cost gains nothing from sharing, so the rows already running keep their pace."""
        shape = shape_of(cohort[0].key)
        alone = self._finish_times(shape, cohort)
        after = self._finish_times(shape, newcomers)
        merged = self._finish_times(shape, cohort + newcomers)
        if alone is None or after is None or merged is None:
            return None
        separate = sum(alone) + sum(alone[-1] + t for t in after)
        return separate - sum(merged)
