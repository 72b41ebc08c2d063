"""mhc_megatron: Manifold-Constrained Hyper-Connections (mHC) for Megatron-Core MoE pretraining.

Layout (dependency direction ``ops <- kernels <- megatron <- training``):

- :mod:`mhc_megatron.ops`: the math of ``docs/mhc-spec.md`` in plain PyTorch (the reference).
- :mod:`mhc_megatron.megatron`: the only package that imports ``megatron.core``.
- :mod:`mhc_megatron.training`: what ``pretrain_mhc.py`` plugs into Megatron's ``pretrain()``.
"""

__version__ = "0.1.0"
