"""One snapshot / restore of everything an update changes, for ``tlm_reset: chunk`` and per-prompt learning.

An update changes the trainable weights, the optimizer's state and learning rates, the LR schedule's position, the
fp16 loss scale and the gradients. A snapshot keeps copies of the first four; a restore puts them back bit for bit
and clears the gradients, so the next chunk or prompt starts exactly where the first one did.
"""

import copy
from dataclasses import dataclass
from typing import Any

import torch


def _state(obj) -> dict[str, Any] | None:
    return copy.deepcopy(obj.state_dict()) if obj is not None else None


@dataclass
class TrainingSnapshot:
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None

    @classmethod
    def take(cls, model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None) -> "TrainingSnapshot":
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return cls(params, _state(optimizer), _state(scheduler), _state(scaler))

    def restore(self, model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.params:
                    param.copy_(self.params[name])
                    param.grad = None
        if optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(self.optimizer))
            optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(copy.deepcopy(self.scaler))
