"""CPU mode: run Megatron-Core 0.19.2's ``pretrain()`` on CPU with the gloo backend.

Targets **megatron-core 0.19.2** exactly (:data:`SUPPORTED_MEGATRON_CORE_VERSION`);
:func:`enable_cpu_mode` refuses any other installed version, because every patch below replaces a
specific function of that release. Nothing happens at import time: the launcher calls
:func:`enable_cpu_mode` when ``--cpu`` is given, before Megatron parses its arguments (validating
tensor-parallel arguments already queries the GPU). It must run before anything initializes
CUDA, and it refuses if something already has; from then on CUDA is hidden
(``CUDA_VISIBLE_DEVICES=""``, ``torch.cuda.is_available() == False``) and every CUDA device
request is mapped to the CPU, so nothing ends up on a GPU even where one exists.

Line numbers are those of the 0.19.2 wheel (``megatron/core/...``, ``megatron/training/...``).

torch.cuda entry points Megatron calls (replaced on ``torch.cuda``):
    ``is_available`` -> False and ``device_count`` -> 0, so torch and Megatron take their CPU
    paths; ``current_device`` -> 0 (used as ``device=`` in ~200 places, e.g.
    ``core/utils.py:2275``; the mode below maps it to the CPU); ``set_device``, ``synchronize``
    (``core/timers.py:152,165``), ``empty_cache`` -> no-ops; ``Stream``/``Event``/
    ``current_stream``/``default_stream``/``stream`` -> in-order CPU stand-ins
    (``training/training.py:1876`` DDP stream, ``moe/token_dispatcher.py:469`` the alltoall
    dispatcher's device-to-host stream and its ``record_event().synchronize()``);
    ``get_rng_state``/``set_rng_state``/``manual_seed`` -> the CPU generator
    (``tensor_parallel/random.py:303-306,490``, ``rerun_state_machine.py:979``,
    ``training/checkpointing.py:417``). On CPU the CPU generator plays the CUDA generator's
    part: dropout draws from it, and the model-parallel RNG tracker forks it.
    ``get_device_capability`` -> (8, 0): ``training/arguments.py:1338-1340`` asks for it only
    to refuse ``--moe-grouped-gemm`` below Ampere; on CPU the experts' grouped GEMM is torch's
    (``megatron/experts.py``), which runs there. Nothing else on the CPU path calls it (it
    raised before this patch).

``device="cuda"`` literals and ``.cuda()`` (:class:`_CudaToCpuMode`, a ``TorchFunctionMode``):
    Megatron creates tensors with ``device='cuda'`` / ``.cuda()`` in about 40 places on the
    ``pretrain()`` path alone, inside long functions (``training/training.py:1131,1137,1818,
    2613,2884,4588``, ``pipeline_parallel/schedules.py:749,1121,2292``,
    ``optimizer/optimizer.py:690-702``, ``optimizer/clip_grads.py:108-112,180``,
    ``rerun_state_machine.py:264``, ``training/checkpointing.py:375``, ...). Patching each of
    those functions would mean copying large parts of Megatron, so one mode maps CUDA device
    arguments (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, an int index) to the CPU and
    makes ``Tensor.cuda()``, ``Tensor.pin_memory()`` and ``Tensor.record_stream()`` no-ops.
    Measured cost: about 1.4 us per torch call (3.8 us vs 2.4 us for a small linear/add/view);
    a training step of the 2-layer, hidden-64 MoE test model makes about 3,100 torch calls, so
    about 4 ms of a 45 ms step, and less in proportion for bigger models.
    Within four Megatron functions that check type strings (below) the mode also makes the
    query ``Tensor.type()`` answer ``torch.cuda.FloatTensor`` etc. for CPU tensors.

``megatron.training.initialize``:
    * ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda=True`` (``initialize.py:66``),
      which ``pretrain()`` never passes: always passed (also rebound in ``megatron.training`` and
      ``megatron.training.training``, which import it by name).
    * ``_initialize_distributed`` skips the model-parallel groups when
      ``torch.cuda.device_count() == 0`` (``initialize.py:270,358``), and ``_set_random_seed``
      skips the model-parallel RNG tracker (``initialize.py:447``): both run with the device
      count reported as 1 (``set_device`` is a no-op). ``--distributed-backend`` is forced to
      gloo (with a printed note when it was something else).
    * ``_warmup_jit_function`` (``initialize.py:497``) warms CUDA fusion kernels; on CPU it only
      makes torch.compile/inductor build C++ kernels (about 10 s on a cold cache): skipped.
* ``core/jit.py:21``: Megatron is imported with its ``torch.compile`` fusions left as plain
  PyTorch, which the CPU flags turn off anyway (``mhc_megatron/megatron_import.py``; 0.62x
  the start-up and exit of a process that loads Megatron, ``benchmarks/bench_startup.py``).
* ``datasets/utils.py:20-30`` ``compile_helpers`` runs ``make``; the wheel has no Makefile but
  ships the compiled ``helpers_cpp``: replaced by an import check.
* ``training/arguments.py:1414`` ``get_device_arch_version()`` reads GPU 0's properties (when TP
  or CP > 1): returns 0 (no GPU architecture), and ``CUDA_DEVICE_MAX_CONNECTIONS`` defaults to 1
  to satisfy the check that follows (``arguments.py:1437``; meaningless on CPU).
* ``tensor_parallel/random.py:104,135`` ``_get_cuda_rng_state``/``_set_cuda_rng_state`` use the
  CUDA default generators directly: they read/write the CPU generator. The tracker's warning
  "CPU RNG state changed within GPU RNG context" (``random.py:331-333``) is then expected (the
  two are the same generator) and is filtered out of that logger.
* ``transformer/torch_norm.py:50`` ``WrappedTorchNorm`` (the local spec's norm without apex)
  refuses ``sequence_parallel``, which MoE with TP requires: the norm is built from a copy of the
  config with ``sequence_parallel=False`` and its parameters are tagged
  ``param.sequence_parallel = True``, as apex's and TE's norms do, so
  ``finalize_model_grads`` all-reduces their gradients over TP (each TP rank sees different
  tokens). Checked: TP2+SP losses equal TP1's to all printed digits.
* ``optimizer/clip_grads.py:174`` asserts ``grad.type() == 'torch.cuda.FloatTensor'`` in
  ``clip_grad_by_total_norm_fp32`` (so the default ``--clip-grad 1.0`` failed), and
  ``distrib_optimizer.py:401,466,758`` / ``optimizer.py:1009,1028`` sort parameters by
  ``torch.cuda.*Tensor`` type strings: those functions run with CUDA type names reported.
* ``moe/moe_utils.py:1184`` ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` converts only CUDA
  tensors, so the alltoall dispatcher (``token_dispatcher.py:927-940``) passes split sizes as
  tensors to ``all_to_all_single`` (``tensor_parallel/mappings.py:444-466``), which rejects
  them: CPU tensors become numpy arrays too.
* ``tensor_parallel/mappings.py:150`` gathers uneven splits with ``all_gather``, which gloo
  only supports for equal sizes (TP+SP+EP with expert-TP > 1): padded to the largest split,
  gathered, and un-padded.
* ``training/datasets/data_samplers.py:105``: each new DataLoader iterator draws its base seed
  from the default CPU generator, which on CPU is also the dropout generator, so a resumed run
  drew different dropout masks than an uninterrupted one: loaders get their own generator
  (seeded with ``--seed``), and ``pin_memory`` is turned off (no accelerator to pin for).
  With it, resuming from a checkpoint reproduces an uninterrupted run exactly.
* Distributed optimizer with torch's Adam (no apex/TE, as always on CPU; not CPU bugs, a GPU
  without apex/TE has them too): loading a checkpoint into a fresh optimizer, the loaded
  ``step`` and its sharing between parameters (``cpu_distributed_optimizer.py``).

Not patched: the distributed optimizer's ``fully_sharded_model_space`` checkpoint format fails
with "ShardedTensor.flattened_range is not supported" on any device: 0.19.2's
``dist_checkpointing/mapping.py:133-134`` rejects every ``flattened_range``, and that format
(``distrib_optimizer.py:1978-2043``) is built on it. ``pretrain()`` never uses it: it passes
``dp_reshardable`` (default) or ``fully_reshardable`` (``--dist-ckpt-optim-fully-reshardable``)
(``training/checkpointing.py:499-505``), and both save and resume on CPU. It is only the core
default when ``DistributedOptimizer.sharded_state_dict`` is called without
``metadata["distrib_optim_sharding_type"]`` (``distrib_optimizer.py:1509-1511``); pass
``dp_reshardable`` there.

The flags ``--cpu`` implies are listed once in ``cpu_settings.py``. Why each: without
``--transformer-impl local`` the TE spec fails to build; ``--no-persist-layer-norm``
(``torch_norm.py:48``) and ``--no-gradient-accumulation-fusion`` (apex's
``fused_weight_gradient_mlp_cuda``) are needed; the other fusions only cost torch.compile time.
With MoE and expert biases, ``--disable-bias-linear`` is still the caller's (it changes the
model): the expert bias+GeLU fusion is refused on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.metadata
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mhc_megatron.megatron_import import import_megatron_uncompiled
from mhc_megatron.training import cpu_distributed_optimizer
from mhc_megatron.training.cpu_settings import CPU_CONFIG, CPU_FLAGS, with_cpu_flags

SUPPORTED_MEGATRON_CORE_VERSION = "0.19.2"
__all__ = ["CPU_CONFIG", "CPU_FLAGS", "enable_cpu_mode", "is_cpu_mode_enabled", "with_cpu_flags"]


_enabled = False
_lock = threading.Lock()
# Every replaced attribute as (owner, name, original), in patching order (for inspection).
_patched: list[tuple[Any, str, Any]] = []
_mode: TorchFunctionMode | None = None
# What the patched torch.cuda.device_count() answers: 0, or 1 inside _pretend_one_device().
_reported_device_count = 0
# > 0 while Tensor.type() reports torch.cuda.* names (see _with_cuda_type_names).
_cuda_type_names_depth = 0


def is_cpu_mode_enabled() -> bool:
    """Whether :func:`enable_cpu_mode` has run in this process."""
    return _enabled


def enable_cpu_mode() -> None:
    """Switch this process to CPU mode: Megatron-Core 0.19.2 on CPU with gloo (idempotent).

    Call it before Megatron parses its arguments and before anything uses CUDA.

    Raises:
        RuntimeError: If the installed megatron-core is not 0.19.2, or CUDA is already
            initialized in this process.
    """
    global _enabled, _mode
    with _lock:
        if _enabled:
            return
        _check_version()
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "enable_cpu_mode() must run before anything uses CUDA, and CUDA is already "
                "initialized in this process: call it first thing in the launcher."
            )
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # also hides GPUs from child processes
        # Megatron first, with its fusions left uncompiled (megatron_import.py; imported
        # earlier, its torch.compile decorations saw the original torch.cuda), then torch.cuda,
        # then the device mode.
        import_megatron_uncompiled()
        _patch_initialize()
        _patch_compile_helpers()
        _patch_arguments()
        _patch_rng()
        _patch_torch_norm()
        _patch_type_checks()
        _patch_alltoall_split_sizes()
        _patch_uneven_all_gather()
        _patch_data_loader()
        _patch_distributed_optimizer()
        _patch_torch_cuda()
        _mode = _CudaToCpuMode()
        _mode.__enter__()  # stays active for the life of the process
        _enabled = True


# --------------------------------------------------------------------------------------------
# Version check and patch helper
# --------------------------------------------------------------------------------------------


def _installed_megatron_core_version() -> str:
    """The installed megatron-core version (from package metadata, without importing it)."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on PYTHONPATH
        from megatron.core import package_info

        return package_info.__version__


def _check_version() -> None:
    version = _installed_megatron_core_version()
    if version != SUPPORTED_MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"mhc_megatron's CPU mode supports megatron-core {SUPPORTED_MEGATRON_CORE_VERSION} "
            f"only, but megatron-core {version} is installed: its patches replace specific "
            f"functions of {SUPPORTED_MEGATRON_CORE_VERSION}. Install "
            f"megatron-core=={SUPPORTED_MEGATRON_CORE_VERSION}, or run on a GPU without --cpu."
        )


def _patch(owner: Any, name: str, value: Any) -> None:
    """Replace the existing attribute ``owner.name`` with ``value``."""
    original = getattr(owner, name)
    _patched.append((owner, name, original))
    setattr(owner, name, value)


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins
# --------------------------------------------------------------------------------------------


class _CpuEvent:
    """``torch.cuda.Event`` on CPU: work runs in order, so an event is just a timestamp."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, **kwargs) -> None:
        self._time: float | None = None

    def record(self, stream=None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: _CpuEvent) -> float:
        """Milliseconds between this event's and ``end_event``'s ``record()``."""
        return (end_event._time - self._time) * 1000.0


class _CpuStream:
    """``torch.cuda.Stream`` on CPU: a single in-order queue, so waiting is a no-op."""

    def __init__(self, device=None, priority: int = 0, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event: _CpuEvent | None = None) -> _CpuEvent:
        event = _CpuEvent() if event is None else event
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CURRENT_STREAM = _CpuStream()


@contextlib.contextmanager
def _stream_context(stream=None):
    yield stream


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # One function object per attribute: torch._dynamo keys its rules by object identity.
    _patch(cuda, "is_available", lambda: False)
    _patch(cuda, "device_count", lambda: _reported_device_count)
    _patch(cuda, "current_device", lambda: 0)
    _patch(cuda, "set_device", lambda device: None)
    _patch(cuda, "synchronize", lambda device=None: None)
    _patch(cuda, "empty_cache", lambda: None)
    _patch(cuda, "Stream", _CpuStream)
    _patch(cuda, "Event", _CpuEvent)
    _patch(cuda, "current_stream", lambda device=None: _CURRENT_STREAM)
    _patch(cuda, "default_stream", lambda device=None: _CURRENT_STREAM)
    _patch(cuda, "stream", _stream_context)
    _patch(cuda, "get_device_capability", lambda device=None: (8, 0))
    _patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _patch(cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))


@contextlib.contextmanager
def _pretend_one_device():
    """Make ``torch.cuda.device_count()`` answer 1 (for initialize.py:270,358,447)."""
    global _reported_device_count
    _reported_device_count = 1
    try:
        yield
    finally:
        _reported_device_count = 0


# --------------------------------------------------------------------------------------------
# device="cuda" -> CPU
# --------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")
_RETURN_SELF = (torch.Tensor.cuda, torch.Tensor.pin_memory)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # In CPU mode an integer device can only mean a CUDA index (current_device() returns 0).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments of torch calls to the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RETURN_SELF:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and _cuda_type_names_depth and len(args) == 1 and not kwargs:
            name = func(*args)  # e.g. "torch.FloatTensor" -> "torch.cuda.FloatTensor"
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _with_cuda_type_names(fn: Callable) -> Callable:
    """Wrap ``fn`` so that ``Tensor.type()`` reports ``torch.cuda.*`` names while it runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _cuda_type_names_depth
        _cuda_type_names_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _cuda_type_names_depth -= 1

    return wrapper


# --------------------------------------------------------------------------------------------
# Megatron patches
# --------------------------------------------------------------------------------------------


def _patch_initialize() -> None:
    import megatron.training
    import megatron.training.training
    from megatron.training import initialize

    orig_initialize_megatron = initialize.initialize_megatron

    @functools.wraps(orig_initialize_megatron)
    def initialize_megatron(*args, allow_no_cuda=True, **kwargs):
        return orig_initialize_megatron(*args, allow_no_cuda=True, **kwargs)

    for module in (initialize, megatron.training, megatron.training.training):
        _patch(module, "initialize_megatron", initialize_megatron)

    orig_initialize_distributed = initialize._initialize_distributed

    @functools.wraps(orig_initialize_distributed)
    def _initialize_distributed(*args, **kwargs):
        from megatron.training import get_args

        megatron_args = get_args()
        if megatron_args.distributed_backend != "gloo":
            if megatron_args.rank == 0:
                print(
                    f"> CPU mode: --distributed-backend {megatron_args.distributed_backend} "
                    "replaced by gloo",
                    flush=True,
                )
            megatron_args.distributed_backend = "gloo"
        with _pretend_one_device():
            return orig_initialize_distributed(*args, **kwargs)

    _patch(initialize, "_initialize_distributed", _initialize_distributed)

    orig_set_random_seed = initialize._set_random_seed

    @functools.wraps(orig_set_random_seed)
    def _set_random_seed(*args, **kwargs):
        with _pretend_one_device():
            return orig_set_random_seed(*args, **kwargs)

    _patch(initialize, "_set_random_seed", _set_random_seed)

    def _warmup_jit_function(tp_size=None) -> None:
        return None

    _patch(initialize, "_warmup_jit_function", _warmup_jit_function)


def _patch_compile_helpers() -> None:
    from megatron.core.datasets import utils as dataset_utils

    def compile_helpers() -> None:
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError as e:
            raise RuntimeError(
                "megatron.core.datasets.helpers_cpp is missing; the megatron-core wheel ships it "
                f"compiled: reinstall megatron-core=={SUPPORTED_MEGATRON_CORE_VERSION}."
            ) from e

    _patch(dataset_utils, "compile_helpers", compile_helpers)


def _patch_arguments() -> None:
    from megatron.training import arguments

    _patch(arguments, "get_device_arch_version", lambda: 0)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


class _DropSameGeneratorWarning(logging.Filter):
    """Drops random.py:333's warning, which is expected when CPU and 'GPU' RNG are one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False) -> None:
        torch.set_rng_state(new_state)

    _patch(tp_random, "_get_cuda_rng_state", _get_cuda_rng_state)
    _patch(tp_random, "_set_cuda_rng_state", _set_cuda_rng_state)
    logging.getLogger(tp_random.__name__).addFilter(_DropSameGeneratorWarning())


def _patch_torch_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    orig_new = WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return orig_new(cls, config, hidden_size, *args, **kwargs)
        # A shallow copy: the norm reads a few fields; __post_init__ validation is not rerun.
        config_without_sp = copy.copy(config)
        config_without_sp.sequence_parallel = False
        norm = orig_new(cls, config_without_sp, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True  # finalize_model_grads all-reduces these over TP
        return norm

    _patch(WrappedTorchNorm, "__new__", staticmethod(__new__))


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    dist_opt = distrib_optimizer.DistributedOptimizer
    _patch(dist_opt, "__init__", _with_cuda_type_names(dist_opt.__init__))  # :401,466,758
    float16_opt = optimizer.Float16OptimizerWithFloat16Params
    _patch(float16_opt, "__init__", _with_cuda_type_names(float16_opt.__init__))  # :1009,1028
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)  # :174
    _patch(clip_grads, "clip_grad_by_total_norm_fp32", clip)
    _patch(optimizer, "clip_grad_by_total_norm_fp32", clip)  # imported by name there


def _patch_alltoall_split_sizes() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    orig = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(orig)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    _patch(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


def _patch_uneven_all_gather() -> None:
    from megatron.core.tensor_parallel import mappings

    orig = mappings._gather_along_first_dim

    @functools.wraps(orig)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        rows = max(output_split_sizes)
        padded = input_.new_zeros((rows, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((rows * group.size(), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat(
            [gathered[i * rows : i * rows + n] for i, n in enumerate(output_split_sizes)]
        )

    _patch(mappings, "_gather_along_first_dim", _gather_along_first_dim)


def _patch_data_loader() -> None:
    from megatron.training import training

    orig = training.build_pretraining_data_loader

    @functools.wraps(orig)
    def build_pretraining_data_loader(dataset, consumed_samples):
        loader = orig(dataset, consumed_samples)
        if isinstance(loader, torch.utils.data.DataLoader):
            from megatron.training import get_args

            loader.generator = torch.Generator().manual_seed(get_args().seed)
            loader.pin_memory = False
        return loader

    _patch(training, "build_pretraining_data_loader", build_pretraining_data_loader)


def _patch_distributed_optimizer() -> None:
    cpu_distributed_optimizer.install(_patch)
    # optimizer.py:68 reads .grad of fp32 parameter-shard views (non-leaf); torch warns, and the
    # warning would be attributed to _CudaToCpuMode's frame in this module.
    warnings.filterwarnings(
        "ignore", message="The .grad attribute of a Tensor that is not a leaf", module=__name__
    )
