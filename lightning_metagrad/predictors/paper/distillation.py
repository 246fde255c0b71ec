"""Online distillation of the per-task meta-networks into one predictor g (section 5.2).

``g`` approximates the running mean of the old tasks' predicted gradients (eqs. 6-7):

    mean^(1:t+1) = t/(t+1) * mean^(1:t) + 1/(t+1) * h^(t+1)
                 ~ t/(t+1) * g(theta)   + 1/(t+1) * h^(t+1)(theta)

so at any time only ``g`` and the current ``h`` are kept: memory is constant in the number of
tasks. Plain PyTorch.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import check_float, check_int
from lightning_metagrad.predictors.paper.meta_network import CoordinateMLP


class RunningMeanDistiller:
    """Maintains ``g`` and the count ``t`` of tasks folded into it.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> d = RunningMeanDistiller(steps=50, num_samples=256)
        >>> h1 = CoordinateMLP((8,))
        >>> d.add_task(h1, theta_samples=torch.randn(1000))  # task 1: g = h1
        >>> d.num_tasks, d.g is not h1
        (1, True)
    """

    def __init__(self, steps: int = 200, num_samples: int = 4096, lr: float = 1e-3):
        self.steps = check_int("steps", steps, minimum=0)
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.lr = check_float("lr", lr, minimum=0, low_open=True)
        self.g: CoordinateMLP | None = None
        self.num_tasks = 0
        self.last_error: float | None = None

    def add_task(
        self,
        h: CoordinateMLP,
        theta_samples: Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        """Fold a finished task's meta-network ``h`` into ``g`` (eq. 7).

        ``theta_samples`` is a 1-D tensor of parameter values the predictor will be queried
        at (typically the model's current parameters); distillation inputs are drawn from
        it, half of them jittered over its range so ``g`` is also trained between them.
        """
        if self.g is None:
            # Task 1: g is initialised to h^(1) (section 5.2).
            self.g = copy.deepcopy(h)
            self.g.requires_grad_(False)
            self.num_tasks = 1
            self.last_error = 0.0
            return
        t = float(self.num_tasks)
        old_g = self.g
        new_g = copy.deepcopy(old_g)
        new_g.requires_grad_(True)
        # The new g's output scale: a mix of both scales, so normalised targets stay O(1).
        new_g.out_scale.copy_((t * old_g.out_scale + h.out_scale) / (t + 1.0))
        optimizer = torch.optim.Adam(new_g.parameters(), lr=self.lr)
        theta_samples = theta_samples.detach().float().reshape(-1)
        low, high = theta_samples.min(), theta_samples.max()
        error = torch.zeros(())
        for _ in range(self.steps):
            x = self._draw(theta_samples, low, high, generator)
            with torch.no_grad():
                # Eq. 7: the running-mean target from the old g and the new task's h.
                target = (t * old_g(x) + h(x)) / (t + 1.0)
            with torch.enable_grad():
                pred = new_g.forward_normalised(x / new_g.in_scale)
                loss = nn.functional.mse_loss(pred, target / new_g.out_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            error = loss.detach()
        new_g.requires_grad_(False)
        self.g = new_g
        self.num_tasks += 1
        self.last_error = float(error)

    def _draw(
        self, theta: Tensor, low: Tensor, high: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        n = self.num_samples
        idx = torch.randint(0, theta.numel(), (n - n // 2,), generator=generator)
        uniform = torch.rand(n // 2, generator=generator)
        return torch.cat([theta[idx.to(theta.device)], (low + (high - low) * uniform.to(theta))])

    def state_dict(self) -> dict:
        return {
            "g": None if self.g is None else self.g.state_dict(),
            "num_tasks": self.num_tasks,
            "last_error": self.last_error,
        }

    def load_state_dict(self, state: dict, template: CoordinateMLP) -> None:
        """Restore; ``template`` is a network of the right shape to load ``g`` into."""
        self.num_tasks = int(state["num_tasks"])
        self.last_error = state["last_error"]
        if state["g"] is None:
            self.g = None
        else:
            self.g = copy.deepcopy(template)
            self.g.load_state_dict(state["g"])
            self.g.requires_grad_(False)
