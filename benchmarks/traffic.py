"""Counts the memory traffic of Triton launches (in Triton's interpreter) and of torch ops.

:class:`TrafficMeter` records, in the order they run, one :class:`Record` per Triton launch and
per torch op:

- **Triton launch**: the bytes its loads and its stores touch, counted once per address within
  the launch (a launch that reads a value twice is assumed to hit in cache the second time;
  ``issued`` keeps the count with every access), split by the kernel argument each address
  falls in. It needs ``TRITON_INTERPRET=1``: the interpreter hands every load and store to
  ``interpreter_builder.create_masked_load`` / ``create_masked_store`` with the addresses and the
  mask, which the meter wraps.
- **torch op** (outside launches, through a ``TorchDispatchMode``, so also the ops autograd runs
  in backward, such as the adds that sum the gradients of a tensor used twice): every tensor
  input is read and every output written, once; in-place ops write what they mutate (and read
  it too, except ``zero_`` / ``fill_`` / ``copy_``); views and ``empty*`` move nothing.

The meter knows nothing about mHC; ``benchmarks/bench_traffic.py`` runs the sites under it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only allocate, or only write what they mutate.
_NO_TRAFFIC = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty"}
_WRITE_ONLY = {"aten::zero_", "aten::fill_", "aten::copy_"}


@dataclass
class Record:
    """Traffic of one Triton launch or torch op.

    Attributes:
        kind: ``triton`` or ``torch``.
        name: the kernel's function name, or the aten op.
        phase: the label set with :meth:`TrafficMeter.phase` when it ran.
        loads, stores: bytes read and written (unique addresses within a launch).
        issued_loads, issued_stores: bytes of every access, repeats included (Triton only).
        tensors: ``{argument: [load bytes, store bytes]}`` (Triton only).
    """

    kind: str
    name: str
    phase: str
    loads: int = 0
    stores: int = 0
    issued_loads: int = 0
    issued_stores: int = 0
    tensors: dict[str, list[int]] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Loads plus stores."""
        return self.loads + self.stores


class _Launch:
    """Addresses one Triton launch touched: ``{itemsize: [address arrays]}`` per direction."""

    def __init__(self, name: str, ranges: list[tuple[int, int, str]]):
        self.name, self.ranges = name, sorted(ranges)
        self.accesses: dict[str, dict[int, list[np.ndarray]]] = {"load": {}, "store": {}}

    def add(self, direction: str, addresses: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
        hit = np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape)
        self.accesses[direction].setdefault(itemsize, []).append(addresses[hit].ravel().copy())

    def finish(self, phase: str) -> Record:
        record = Record("triton", self.name, phase)
        starts = np.array([r[0] for r in self.ranges], dtype=np.uint64)
        for direction, by_size in self.accesses.items():
            unique_total = issued_total = 0
            for itemsize, chunks in by_size.items():
                every = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)
                unique = np.unique(every)
                unique_total += unique.size * itemsize
                issued_total += every.size * itemsize
                owner = np.searchsorted(starts, unique, side="right") - 1
                for index in np.unique(owner):
                    start, end, name = self.ranges[index] if index >= 0 else (0, 0, "?")
                    inside = unique[owner == index]
                    name = name if index >= 0 and bool(np.all(inside < end)) else "?"
                    counts = record.tensors.setdefault(name, [0, 0])
                    counts[direction == "store"] += int(inside.size) * itemsize
            if direction == "load":
                record.loads, record.issued_loads = unique_total, issued_total
            else:
                record.stores, record.issued_stores = unique_total, issued_total
        return record


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the memory a tensor spans (a broadcast view reads its storage once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum(
        (size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)
    )
    return min(span, t.numel()) * t.element_size()


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


class _OpCounter(TorchDispatchMode):
    def __init__(self, meter: TrafficMeter):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        meter = self.meter
        name = func._schema.name
        if meter._launch is not None or func.is_view or name in _NO_TRAFFIC:
            return out
        mutated = []
        for position, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = kwargs.get(argument.name, args[position] if position < len(args) else None)
                mutated.extend(_tensors([value]))
        written = {id(t) for t in mutated}
        reads = [t for t in _tensors([*args, *kwargs.values()]) if id(t) not in written]
        if name not in _WRITE_ONLY:
            reads += mutated
        writes = mutated if mutated else _tensors([out])
        record = Record("torch", name.removeprefix("aten::"), meter._phase)
        record.loads = sum(_tensor_bytes(t) for t in reads)
        record.stores = sum(_tensor_bytes(t) for t in writes)
        meter.records.append(record)
        return out


class TrafficMeter:
    """Context manager recording :class:`Record` s in ``self.records``.

    Example::

        with TrafficMeter() as meter:
            with meter.phase("fwd"):
                out = f(x)
    """

    def __init__(self):
        self.records: list[Record] = []
        self._phase = ""
        self._launch: _Launch | None = None
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Labels what runs inside with ``name``."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def __enter__(self) -> TrafficMeter:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        load, store = builder.create_masked_load, builder.create_masked_store
        grid_call = interpreter.GridExecutor.__call__
        meter = self

        def masked_load(ptrs, mask, other, *rest):
            if meter._launch is not None:
                size = ptrs.get_element_ty().primitive_bitwidth // 8
                meter._launch.add("load", ptrs.data, mask.data, size)
            return load(ptrs, mask, other, *rest)

        def masked_store(ptrs, value, mask, *rest):
            if meter._launch is not None:
                size = ptrs.get_element_ty().primitive_bitwidth // 8
                meter._launch.add("store", ptrs.data, mask.data, size)
            return store(ptrs, value, mask, *rest)

        def launch(executor, *args, **kwargs):
            names = list(executor.arg_names)
            values = dict(zip(names, args, strict=False)) | kwargs
            ranges = [
                (v.data_ptr(), v.untyped_storage().data_ptr() + v.untyped_storage().nbytes(), k)
                for k, v in values.items()
                if isinstance(v, torch.Tensor)
            ]
            meter._launch = _Launch(executor.fn.__name__, ranges)
            try:
                return grid_call(executor, *args, **kwargs)
            finally:
                meter.records.append(meter._launch.finish(meter._phase))
                meter._launch = None

        stack = self._stack
        for owner, name, value in (
            (builder, "create_masked_load", masked_load),
            (builder, "create_masked_store", masked_store),
            (interpreter.GridExecutor, "__call__", launch),
        ):
            original = getattr(owner, name)
            setattr(owner, name, value)
            stack.callback(setattr, owner, name, original)
        stack.enter_context(_OpCounter(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
