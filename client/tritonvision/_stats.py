"""Where the time goes: Triton's per-model statistics, differenced between two snapshots.

Triton keeps cumulative counters per model. For a request, ``queue`` is the time it waited for a batch and
``compute_input/infer/output`` the time of the batch it ran in (so per-request compute of a batch of 8 is
counted 8 times); ``batch_stats`` count executions per batch size once each. Between two snapshots:

* requests = success.count; average request/queue/input/infer/output time = ns / count
* executions and inferences (images): their ratio is the average dynamic batch size
* infer time per image = the executions' compute_infer ns (from ``batch_stats``) / inferences

Counters that went backwards mean the model started again in between (a server restart, a model reload):
its figures then count from that start, and the stage is marked ``restarted``. A restart after which the
model served more than before goes unnoticed; the counters cannot tell it.

Behind a ``round_robin`` client (every pod of a headless Service) a snapshot holds every server's counters,
by address: intervals are differenced server by server, then summed. A server that joined in between counts
from its start (marked ``restarted``); one that answered only the first snapshot is listed in ``lost``.
"""

from __future__ import annotations

import functools
import logging
import operator
import time
from dataclasses import asdict, dataclass, field

from .exceptions import TritonVisionError
from .spec import ENSEMBLE, PREPROCESS, RESNET50, VALIDATE

log = logging.getLogger(__name__)

_STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class Counter:
    count: int = 0
    ns: int = 0

    @classmethod
    def parse(cls, d: dict | None) -> "Counter":
        d = d or {}
        return cls(int(d.get("count", 0)), int(d.get("ns", 0)))

    def __sub__(self, other: "Counter") -> "Counter":
        return Counter(self.count - other.count, self.ns - other.ns)

    def __add__(self, other: "Counter") -> "Counter":
        return Counter(self.count + other.count, self.ns + other.ns)

    def mean_ms(self) -> float:
        return self.ns / self.count / 1e6 if self.count else 0.0


@dataclass(frozen=True)
class ModelCounters:
    """Cumulative counters of one model version, as Triton reports them."""

    name: str
    version: str = ""
    inference_count: int = 0
    execution_count: int = 0
    success: Counter = Counter()
    fail: Counter = Counter()
    queue: Counter = Counter()
    compute_input: Counter = Counter()
    compute_infer: Counter = Counter()
    compute_output: Counter = Counter()
    #: batch size -> (executions, compute_infer ns of those executions)
    batches: dict[int, Counter] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict) -> "ModelCounters":
        inf = d.get("inference_stats", {})
        return cls(
            name=d["name"],
            version=str(d.get("version", "")),
            inference_count=int(d.get("inference_count", 0)),
            execution_count=int(d.get("execution_count", 0)),
            success=Counter.parse(inf.get("success")),
            fail=Counter.parse(inf.get("fail")),
            **{stage: Counter.parse(inf.get(stage)) for stage in _STAGES},
            batches={int(b["batch_size"]): Counter.parse(b.get("compute_infer")) for b in d.get("batch_stats", [])},
        )

    def went_back_from(self, earlier: "ModelCounters") -> bool:
        """True when a cumulative counter is lower than in ``earlier``: the model started again since."""
        pairs = [(self.inference_count, earlier.inference_count), (self.execution_count, earlier.execution_count),
                 (self.success.count, earlier.success.count), (self.fail.count, earlier.fail.count)]
        return any(now < before for now, before in pairs)

    def __sub__(self, other: "ModelCounters") -> "ModelCounters":
        sizes = set(self.batches) | set(other.batches)
        return ModelCounters(
            name=self.name,
            version=self.version,
            inference_count=self.inference_count - other.inference_count,
            execution_count=self.execution_count - other.execution_count,
            success=self.success - other.success,
            fail=self.fail - other.fail,
            **{stage: getattr(self, stage) - getattr(other, stage) for stage in _STAGES},
            batches={
                s: self.batches.get(s, Counter()) - other.batches.get(s, Counter())
                for s in sizes
                if self.batches.get(s, Counter()) != other.batches.get(s, Counter())
            },
        )

    def __add__(self, other: "ModelCounters") -> "ModelCounters":
        """Two servers' counters of the same model together."""
        return ModelCounters(
            name=self.name,
            version=self.version,
            inference_count=self.inference_count + other.inference_count,
            execution_count=self.execution_count + other.execution_count,
            success=self.success + other.success,
            fail=self.fail + other.fail,
            **{stage: getattr(self, stage) + getattr(other, stage) for stage in _STAGES},
            batches={s: self.batches.get(s, Counter()) + other.batches.get(s, Counter())
                     for s in set(self.batches) | set(other.batches)},
        )


@dataclass(frozen=True)
class StageStats:
    """One model's figures over an interval. Times in milliseconds, averaged per request."""

    model: str
    requests: int
    failures: int
    executions: int
    inferences: int
    request_ms: float
    queue_ms: float
    input_ms: float
    infer_ms: float
    output_ms: float
    infer_ms_per_image: float
    #: the model started again during the interval (its counters went backwards): figures since that start
    restarted: bool = False

    @property
    def avg_batch(self) -> float:
        """Images per execution: how well the dynamic batcher grouped requests."""
        return self.inferences / self.executions if self.executions else 0.0

    @classmethod
    def from_delta(cls, d: ModelCounters, restarted: bool = False) -> "StageStats":
        batch_infer_ns = sum(c.ns for c in d.batches.values())
        return cls(
            restarted=restarted,
            model=d.name,
            requests=d.success.count,
            failures=d.fail.count,
            executions=d.execution_count,
            inferences=d.inference_count,
            request_ms=d.success.mean_ms(),
            queue_ms=d.queue.mean_ms(),
            input_ms=d.compute_input.mean_ms(),
            infer_ms=d.compute_infer.mean_ms(),
            output_ms=d.compute_output.mean_ms(),
            infer_ms_per_image=batch_infer_ns / d.inference_count / 1e6 if d.inference_count else 0.0,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "avg_batch": self.avg_batch}


def _models(response: dict) -> dict[str, ModelCounters]:
    models = {}
    for d in response.get("model_stats", []):
        m = ModelCounters.parse(d)
        models[m.name] = m
    return models


def _summed(per_server) -> dict[str, ModelCounters]:
    total: dict[str, ModelCounters] = {}
    for models in per_server:
        for name, m in models.items():
            total[name] = total[name] + m if name in total else m
    return total


@dataclass(frozen=True)
class Statistics:
    """A snapshot of every model's counters; ``later - earlier`` is the :class:`Breakdown` between them.

    ``models`` are summed over ``servers`` (address -> that server's counters; one entry for one server);
    ``unreachable`` maps a server that did not answer this snapshot to its error."""

    models: dict[str, ModelCounters]
    taken_at: float = field(default_factory=time.monotonic)
    servers: dict[str, dict[str, ModelCounters]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.models and not self.servers:
            object.__setattr__(self, "servers", {"": self.models})

    @classmethod
    def parse(cls, response: dict, taken_at: float | None = None, server: str = "") -> "Statistics":
        models = _models(response)
        return cls(models, time.monotonic() if taken_at is None else taken_at, {server: models})

    @classmethod
    def gather(cls, responses: dict[str, dict | TritonVisionError], taken_at: float | None = None) -> "Statistics":
        """One snapshot of several servers' responses (by address); a server that failed is ``unreachable``,
        and if every one failed, its error is raised."""
        answered = {a: _models(r) for a, r in responses.items() if not isinstance(r, TritonVisionError)}
        failed = {a: r for a, r in responses.items() if isinstance(r, TritonVisionError)}
        if not answered:
            raise next(iter(failed.values()))
        for address, error in failed.items():
            log.warning("no statistics from %s: %s", address, error.message)
        return cls(_summed(answered.values()), time.monotonic() if taken_at is None else taken_at, answered,
                   {a: e.message for a, e in failed.items()})

    def __sub__(self, earlier: "Statistics") -> "Breakdown":
        seconds = self.taken_at - earlier.taken_at
        by_server: dict[str, Breakdown] = {}
        deltas: dict[str, list[tuple[ModelCounters, bool]]] = {}
        for address, models in self.servers.items():
            before_models = earlier.servers.get(address)
            # A server missing from a non-empty earlier snapshot joined since (or did not answer then).
            joined = before_models is None and bool(earlier.servers)
            stages = []
            for name, now in models.items():
                before = (before_models or {}).get(name, ModelCounters(name))
                restarted = joined or now.went_back_from(before)
                delta = now - (ModelCounters(name) if restarted else before)
                deltas.setdefault(name, []).append((delta, restarted))
                stages.append(StageStats.from_delta(delta, restarted))
            by_server[address] = Breakdown(_ordered(stages), seconds, servers=(address,))
        stages = [StageStats.from_delta(functools.reduce(operator.add, (d for d, _ in parts)), any(r for _, r in parts))
                  for name, parts in deltas.items()]
        return Breakdown(_ordered(stages), seconds, servers=tuple(self.servers),
                         lost=tuple(a for a in earlier.servers if a not in self.servers),
                         by_server=by_server if len(by_server) > 1 else {})

    def breakdown(self) -> "Breakdown":
        """Everything since the server started."""
        return self - Statistics({}, self.taken_at)


def _ordered(stages: list[StageStats]) -> list[StageStats]:
    # The pipeline's order first (ensemble, then its steps), other models after.
    rank = {ENSEMBLE: 0, VALIDATE: 1, PREPROCESS: 2, RESNET50: 3}
    return sorted(stages, key=lambda s: (rank.get(s.model, len(rank)), s.model))


_COLUMNS = (
    ("model", "{:<12}", "model"),
    ("requests", "{:>8}", "requests"),
    ("fail", "{:>5}", "failures"),
    ("exec", "{:>6}", "executions"),
    ("images", "{:>7}", "inferences"),
    ("batch", "{:>6.2f}", "avg_batch"),
    ("request ms", "{:>10.2f}", "request_ms"),
    ("queue ms", "{:>9.2f}", "queue_ms"),
    ("input ms", "{:>9.2f}", "input_ms"),
    ("infer ms", "{:>9.2f}", "infer_ms"),
    ("output ms", "{:>9.2f}", "output_ms"),
    ("infer ms/img", "{:>12.2f}", "infer_ms_per_image"),
)


@dataclass(frozen=True)
class Breakdown:
    """Per-stage figures over an interval of ``seconds``: the ensemble first, then each step."""

    stages: list[StageStats]
    seconds: float
    #: the servers summed (addresses; one entry for one server)
    servers: tuple[str, ...] = ()
    #: servers in the first snapshot but not the second: what they served in between is missing
    lost: tuple[str, ...] = ()
    #: each server's own figures, where several were summed (which pod is slow, which gets no traffic)
    by_server: dict[str, "Breakdown"] = field(default_factory=dict)

    def __getitem__(self, model: str) -> StageStats:
        for s in self.stages:
            if s.model == model:
                return s
        raise KeyError(model)

    @property
    def restarted(self) -> list[str]:
        """The models that started again during the interval; their figures count from that start."""
        return [s.model for s in self.stages if s.restarted]

    def active(self) -> "Breakdown":
        """Only the models that served requests in the interval, or started again during it."""
        return Breakdown([s for s in self.stages if s.requests or s.failures or s.restarted], self.seconds,
                         self.servers, self.lost, {a: b.active() for a, b in self.by_server.items()})

    def table(self) -> str:
        header = "  ".join(fmt.replace(".2f", "").format(title) for title, fmt, _ in _COLUMNS)
        lines = [header, "-" * len(header)]
        for s in self.stages:
            row = "  ".join(fmt.format(getattr(s, attr)) for _, fmt, attr in _COLUMNS)
            lines.append(row + ("  *" if s.restarted else ""))
        if self.restarted:
            lines.append("* restarted during the interval (server restart, model reload or a server that joined): "
                         "counted from that start")
        if len(self.servers) > 1:
            lines.append(f"summed over {len(self.servers)} servers: {', '.join(self.servers)}")
        if self.lost:
            lines.append(f"not counted (no second snapshot): {', '.join(self.lost)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"seconds": self.seconds, "servers": list(self.servers), "lost": list(self.lost),
               "stages": [s.to_dict() for s in self.stages]}
        if self.by_server:
            out["by_server"] = {a: [s.to_dict() for s in b.stages] for a, b in self.by_server.items()}
        return out
