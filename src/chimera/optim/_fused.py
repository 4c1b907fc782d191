"""Compiled (``torch.compile``) fast paths of the optimizers: the plumbing they share.

``Chimera21``, ``STAC`` and ``ScaledOptum`` take ``fused: bool | None``. ``check_fused``
validates it (with ``foreach``), ``use_fused`` decides per group and step whether the compiled
step runs, and ``run_compiled`` runs it.

When ``fused=None`` compiles: on one CUDA device where triton is usable, always; on CPU only
for callers that pass ``cpu=True`` to ``use_fused`` and where inductor can build C++
(``cpu_compile_usable``). Chimera21 and STAC pass it when their parameters with a gradient hold
``CPU_MIN_NUMEL`` elements or more together (``worth_compiling_on_cpu``; one decision for all
groups, so small no-decay groups compile with the large ones), ScaledOptum when its registered
ternary weights do. Measured on a 2-core x86 CPU under load, torch 2.13, 1 thread
(``chimera perf optim``): per parameter, Chimera21's compiled step takes ~2-3 ns against ~15
ns for the for-loop path (the CPU's eager default) and ~65 ns for foreach; STAC's ~2 ns
against ~7 ns. At ``CPU_MIN_NUMEL`` = 2^20 parameters that saves ~10 ms per step, which
repays the one-time compile of the first step within a few thousand steps: cold (empty
inductor cache) ~50 s for ResNet-20's 65 tensors and ~2 min for GPT-2 small's 148
(Chimera21; STAC ~20 s and ~1.5 min); warm, 5-20 s of dynamo tracing. Below the threshold
(tests, small models) the eager step runs, so nothing compiles needlessly. Inductor's FX graph
cache and AOTAutograd cache (on by default, ``TORCHINDUCTOR_FX_GRAPH_CACHE``; directory
``TORCHINDUCTOR_CACHE_DIR``) keep the compiled graphs across processes: what a later process
pays is dynamo's tracing.

The compiled steps are written per tensor (plain elementwise torch ops on 1-D views, one loop
over the tensors of a group inside one graph) so inductor emits one kernel per tensor that
reads and writes each state tensor once; per-tensor scalars (bias corrections) are computed
once per step in a small kernel and returned, so that they are not recomputed per element.

``run_compiled(fn, *args, key=..., device=..., scalars=..., **static)`` calls
``torch.compile(fn, fullgraph=True, dynamic=False)`` compiled on a *private copy* of ``fn``'s
code object, and returns what ``fn`` returns. Dynamo keeps its graphs, and its recompile
limit, per code object, so each cache entry holds the graph of one parameter list and cannot
push another entry's graphs out. The entry key is ``(fn, device, static keyword arguments,
ids of the key objects)`` (the parameters or modules updated); dynamo's guards on every
tensor's shape, stride and dtype still protect an entry whose ids were reused.
``MAX_ENTRIES`` entries at most are kept (least recently used dropped): this bounds compile
work and memory.

Per-step hyper-parameters (``lr`` under a schedule, decay factors) reach the graph as 0-dim
float64 tensors owned by the entry and refilled in place (``fill_``) when a value changes. A
Python float would be baked into the graph and recompile it at every change; a tensor built
anew each step would need a host-to-device copy. Step counters are state tensors on the
parameters' device, so they never recompile the graph either.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from chimera._validate import optional_bool, require
from chimera.compile_support import compile_usable, cpu_compile_usable

MAX_ENTRIES = 32
# fused=None compiles the CPU step of Chimera21 and STAC from this many parameters on.
CPU_MIN_NUMEL = 2**20
# The generated wrapper would otherwise check size, stride and alignment of every input on
# every call (microseconds per tensor, milliseconds per step for GPT-2's ~900 state tensors);
# dynamo's guards already check sizes and strides before the graph runs.
_INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False}


def check_fused(fused: Any, foreach: Any = None) -> None:
    """``ValueError`` unless ``foreach`` and ``fused`` are None/True/False and not both True (the
    two name different implementations; ``fused=True`` with ``foreach=False`` is allowed and runs
    the compiled step, as in ``torch.optim.Adam``)."""
    optional_bool("foreach", foreach)
    optional_bool("fused", fused)
    require(not (fused and foreach), "fused", fused, "None or False together with foreach=True")


def use_fused(
    fused: bool | None,
    tensors: Sequence[Tensor],
    foreach: bool | None = None,
    *,
    cpu: bool = False,
) -> bool:
    """Whether a group runs its compiled step: ``fused`` when given; for ``None``, only without
    an explicit ``foreach`` choice, with every tensor on one device, and there: on CUDA where
    ``compile_usable`` holds; on CPU when ``cpu`` (the caller's ``worth_compiling_on_cpu``)
    and ``cpu_compile_usable`` (dynamo and a C++ compiler; module docstring)."""
    if fused is not None:
        return fused
    if foreach is not None or not tensors:
        return False
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return False
    if device.type == "cpu":
        return cpu and cpu_compile_usable()
    return compile_usable(device.type)


def worth_compiling_on_cpu(tensors: Iterable[Tensor]) -> bool:
    """Whether an optimizer over ``tensors`` (all of its parameters with a gradient) is large
    enough for ``fused=None`` to compile its CPU step: ``CPU_MIN_NUMEL`` elements or more."""
    return sum(t.numel() for t in tensors if t.device.type == "cpu") >= CPU_MIN_NUMEL


def flat_views(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """1-D views of ``tensors`` when all are contiguous (inductor then emits one simple loop
    per kernel), else the tensors themselves."""
    if all(t.is_contiguous() for t in tensors):
        return tuple(t.view(-1) for t in tensors)
    return tuple(tensors)


def foreach_add_(params: list[Tensor], tensors: list[Tensor], alpha: float | Tensor) -> None:
    """``p += alpha * t`` pairwise; ``alpha`` is a Python float (eager paths) or a 0-dim tensor
    (compiled paths). Both round like ``torch.add(p, t, alpha=alpha)``."""
    if isinstance(alpha, Tensor):
        torch._foreach_add_(params, torch._foreach_mul(tensors, alpha))
    else:
        torch._foreach_add_(params, tensors, alpha=alpha)


def _private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object, hence its own dynamo cache."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _bind(fn: Callable[..., Any], static: dict[str, Any]) -> Callable[..., Any]:
    """``fn`` with ``static`` bound from a closure, where dynamo treats its floats as constants
    (floats passed as arguments are first traced symbolically, which costs a second trace)."""

    def bound(*args: Any) -> Any:
        return fn(*args, **static)

    return bound


class _Entry:
    """One compiled function and the 0-dim float64 tensors that carry its per-step scalars."""

    def __init__(
        self, fn: Callable[..., Any], device: torch.device, static: dict[str, Any]
    ) -> None:
        self.fn = torch.compile(
            _private_copy(_bind(fn, static)),
            fullgraph=True,
            dynamic=False,
            options=_INDUCTOR_OPTIONS,
        )
        self.device = device
        self.values: tuple[float, ...] = ()
        self.scalars: list[Tensor] = []

    def scalar_tensors(self, values: tuple[float, ...]) -> list[Tensor]:
        if len(values) != len(self.scalars):
            self.scalars = [
                torch.tensor(v, dtype=torch.float64, device=self.device) for v in values
            ]
        else:
            for t, old, new in zip(self.scalars, self.values, values, strict=True):
                if old != new:
                    t.fill_(new)
        self.values = values
        return self.scalars


_ENTRIES: OrderedDict[tuple, _Entry] = OrderedDict()


def run_compiled(
    fn: Callable[..., Any],
    *args: Any,
    key: Sequence[object],
    device: torch.device,
    scalars: Sequence[float] = (),
    **static: Any,
) -> Any:
    """``torch.compile(fn)(*args, *scalar_tensors, **static)`` from the bounded cache; returns
    what ``fn`` returns.

    ``key`` (the parameters, or modules, the call updates) keys the entry by identity together
    with ``fn``, ``device`` and ``static`` (hashable constants baked into the graph);
    ``scalars`` become 0-dim float64 tensors on ``device``, where every tensor must live.
    """
    cache_key = (fn, device, tuple(static.items()), tuple(map(id, key)))
    entry = _ENTRIES.get(cache_key)
    if entry is None:
        entry = _ENTRIES[cache_key] = _Entry(fn, device, static)
        if len(_ENTRIES) > MAX_ENTRIES:
            _ENTRIES.popitem(last=False)
    else:
        _ENTRIES.move_to_end(cache_key)
    return entry.fn(*args, *entry.scalar_tensors(tuple(map(float, scalars))))
