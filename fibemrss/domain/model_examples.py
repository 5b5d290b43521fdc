"""Example model factories a task can name as "fibemrss.domain.model_examples:<name>" (any importable
factory works the same way: input_dim in, a torch module with one logit out)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def residual_mlp(input_dim: int) -> Any:
    """A small MLP with a linear skip connection: the logistic regression plus learned interactions."""

    class ResidualMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(input_dim, 1)
            self.hidden = nn.Sequential(nn.Linear(input_dim, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + self.hidden(x)

    return ResidualMLP()
