"""Megatron-Core 0.19.2's distributed optimizer with torch's Adam (no apex or TransformerEngine).

Installed by CPU mode (``cpu.py``), where there is never apex or TE; these are not CPU bugs, a
GPU without them has them too. Line numbers are those of ``megatron/core/optimizer/``:

``distrib_optimizer.py:837-839`` ``state_dict()`` asserts one ``step`` among the per-parameter
states, which torch's Adam only creates at its first step, so loading a checkpoint into a fresh
optimizer failed: an empty state gives the layout of ``:865-883`` with step 0 (replaced by the
loaded value). ``:1223-1225`` copies loaded values into fp32 main parameters, which are views
of leaf parameters, outside ``no_grad`` (error), and copies the load template's placeholder
``step`` over the loaded one (``:1953-1957`` makes it a non-persistent object): runs under
``no_grad`` and skips ``step``, which ``load_state_dict`` restores from the param groups
(``:1024-1031``). ``:1030-1031`` gives every parameter the same ``step`` tensor, which Adam
then increments once per parameter: each parameter gets its own copy after loading.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch


def install(patch: Callable[[Any, str, Any], None]) -> None:
    """Replace the three methods through ``patch(owner, name, value)`` (CPU mode's recorder).

    Nothing is replaced where apex or TE is installed: Megatron's own optimizer is used then.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    dist_opt = distrib_optimizer.DistributedOptimizer
    orig_state_dict = dist_opt.state_dict
    orig_set_states = dist_opt._set_main_param_and_optimizer_states
    orig_load_state_dict = dist_opt.load_state_dict

    @functools.wraps(orig_state_dict)
    def state_dict(self):
        if len(self.optimizer.state) > 0 or self.ddp_config.use_megatron_fsdp:
            return orig_state_dict(self)
        inner_state_dict = self.optimizer.state_dict()
        result = {"optimizer": {k: v for k, v in inner_state_dict.items() if k != "state"}}
        for param_group in result["optimizer"]["param_groups"]:
            del param_group["params"]
            param_group["step"] = 0  # no step taken yet; loading replaces it
        if self.grad_scaler:
            result["grad_scaler"] = self.grad_scaler.state_dict()
        return result

    @functools.wraps(orig_set_states)
    @torch.no_grad()
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        return orig_set_states(self, model_param, {**tensors, "step": None})

    @functools.wraps(orig_load_state_dict)
    def load_state_dict(self, state_dict):
        orig_load_state_dict(self, state_dict)
        for param_state in self.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()

    patch(dist_opt, "state_dict", state_dict)
    patch(dist_opt, "_set_main_param_and_optimizer_states", _set_main_param_and_optimizer_states)
    patch(dist_opt, "load_state_dict", load_state_dict)
