"""The coordinate-wise meta-network h of the paper (section 2.2, eqs. 3-4).

One small scalar MLP is applied independently to every coordinate of the parameter vector:
``h(theta_j) ~ grad_j``. Plain PyTorch; no Lightning needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_metagrad._validation import check_choice, check_float, check_int, check_int_sequence

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}
#: The activation names :class:`CoordinateMLP` accepts.
Activation = Literal["relu", "silu", "tanh"]
ACTIVATIONS: tuple[Activation, ...] = ("relu", "silu", "tanh")


class CoordinateMLP(nn.Module):
    """A scalar-to-scalar MLP applied to every coordinate (eq. 4): ``h(theta_j; phi) ~ grad_j``.

    Inputs and outputs are normalised: ``h(theta) = out_scale * mlp(theta / in_scale)``, with the
    scales held as buffers so they travel with ``state_dict``. The default shape 1-256-256-256-1
    is the paper's. The initial weights come from ``generator`` if given (torch's global RNG
    is then left alone), else from torch's global RNG as for any ``nn.Linear``.

    Example:
        >>> h = CoordinateMLP(hidden_sizes=(8, 8))
        >>> h(torch.zeros(5)).shape
        torch.Size([5])
    """

    in_scale: Tensor
    out_scale: Tensor

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (256, 256, 256),
        activation: Activation = "relu",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        sizes = check_int_sequence("hidden_sizes", hidden_sizes)
        activation = check_choice("activation", activation, ACTIVATIONS)
        # With a generator the weights are drawn from it alone: built on the meta device
        # (no draw from torch's global RNG), then initialised by reset_parameters.
        device = None if generator is None else torch.device("meta")
        layers: list[nn.Module] = []
        width = 1
        for size in sizes:
            layers += [nn.Linear(width, size, device=device), _ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, 1, device=device))
        self.net = nn.Sequential(*layers)
        if generator is not None:
            self.net.to_empty(device="cpu")
            self.reset_parameters(generator)
        self.hidden_sizes = sizes
        self.activation = activation
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))

    def forward(self, theta: Tensor) -> Tensor:
        """Predict one value per coordinate of a 1-D tensor ``theta``."""
        x = (theta / self.in_scale).unsqueeze(-1)
        return self.net(x).squeeze(-1) * self.out_scale

    def forward_normalised(self, x: Tensor) -> Tensor:
        """The raw MLP on already normalised inputs (used for training with MSE, eq. 4)."""
        return self.net(x.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw all weights (PyTorch's default Linear init), reproducibly with ``generator``."""
        for module in self.net:
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                w = torch.empty(module.weight.shape).uniform_(-bound, bound, generator=generator)
                b = torch.empty(module.bias.shape).uniform_(-bound, bound, generator=generator)
                module.weight.copy_(w)
                module.bias.copy_(b)


class MetaNetwork:
    """Trains a :class:`CoordinateMLP` on ``(theta_j, target_j)`` pairs while a task trains.

    Each :meth:`observe` call draws ``coords_per_step`` random coordinates and takes one Adam
    step on the MSE between ``h(theta_j)`` and ``target_j`` (section 2.2), in normalised units:
    inputs are divided by ``in_scale`` (fixed for the whole run, so all tasks' networks share
    one input axis) and targets by ``out_scale`` (the target RMS at the task's first
    observation, so every task trains at the same loss scale).

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> meta = MetaNetwork(CoordinateMLP((16, 16)), coords_per_step=64, generator=gen)
        >>> theta = torch.randn(1000)
        >>> loss, rel_error = meta.observe(theta, -theta)  # learn grad = -theta
        >>> bool(loss >= 0)
        True
    """

    def __init__(
        self,
        net: CoordinateMLP,
        coords_per_step: int = 4096,
        lr: float = 1e-3,
        generator: torch.Generator | None = None,
    ):
        self.net = net
        self.coords_per_step = check_int("coords_per_step", coords_per_step, minimum=1)
        self.lr = check_float("lr", lr, minimum=0, low_open=True)
        self.generator = generator if generator is not None else torch.Generator()
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        self.num_updates = 0

    def reset(self, in_scale: float | Tensor) -> None:
        """Start a fresh network for a new task: new weights, new Adam state, unset out scale."""
        self.net.reset_parameters(self.generator)
        self.net.in_scale.fill_(float(in_scale))
        self.net.out_scale.fill_(0.0)  # 0 means "set from the first observation"
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.num_updates = 0

    def sample_indices(self, numel: int, device: torch.device) -> Tensor:
        """Random coordinate indices for one update (drawn on CPU for reproducibility)."""
        k = min(self.coords_per_step, numel)
        return torch.randint(0, numel, (k,), generator=self.generator).to(device)

    def observe(
        self, theta: Tensor, target: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One MSE step of h on sampled pairs; returns ``(loss, relative error)``.

        ``theta`` and ``target`` are flat 1-D tensors of equal length; ``index`` selects the
        coordinates (drawn with :meth:`sample_indices` when omitted). Both must be finite.
        The loss (normalised units) and the relative error ``MSE / mean(target^2)`` (an
        estimate of ``1 - R^2``) are measured before the update, on coordinates drawn afresh,
        so they are held-out figures.
        """
        if index is None:
            index = self.sample_indices(theta.numel(), theta.device)
        x = theta.detach()[index].float()
        y = target.detach()[index].float()
        if float(self.net.out_scale) == 0.0:
            rms = y.pow(2).mean().sqrt()
            self.net.out_scale.fill_(float(rms) if float(rms) > 0 else 1.0)
        x = x / self.net.in_scale
        y = y / self.net.out_scale
        with torch.enable_grad():
            loss = nn.functional.mse_loss(self.net.forward_normalised(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.num_updates += 1
        loss = loss.detach()
        return loss, loss / y.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)

    @torch.no_grad()
    def relative_error(self, theta: Tensor, target: Tensor, index: Tensor) -> Tensor:
        """Held-out error ``MSE(h(theta), target) / mean(target^2)`` on ``index`` (1 - R^2-like)."""
        y = target[index].float()
        pred = self.net(theta[index].float())
        denom = y.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)
        return (pred - y).pow(2).mean() / denom

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state["num_updates"])
