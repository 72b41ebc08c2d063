"""mhc_megatron: Manifold-Constrained Hyper-Connections (mHC) for Megatron-Core MoE pretraining.

Layout (dependency direction ``ops <- kernels <- megatron <- training``):

- :mod:`mhc_megatron.ops`: the math of ``docs/mhc-spec.md`` in plain PyTorch (the reference).
- :mod:`mhc_megatron.kernels`: fused Triton kernels with the ops' signatures.
- :mod:`mhc_megatron.megatron`: the model side of Megatron-Core: config, sites, layers, the
  stream lifecycle (``streams.py``), specs and the model builder. Building a model changes
  nothing global.
- :mod:`mhc_megatron.training`: what ``pretrain_mhc.py`` plugs into Megatron's ``pretrain()``:
  arguments, run checks, guards, CPU mode, and ``megatron_patches.py``, the one list of every
  run-time change to Megatron.
- :mod:`mhc_megatron.data` and :mod:`mhc_megatron.sweep`: the libraries behind
  ``tools/preprocess_data.py`` and ``tools/scaling_sweep.py``.
- :mod:`mhc_megatron.megatron_log` (Megatron's log lines) and :mod:`mhc_megatron.processes`
  (ports, one-rank groups, killing launches): shared by tools, tests and benchmarks.
"""

__version__ = "0.1.0"
