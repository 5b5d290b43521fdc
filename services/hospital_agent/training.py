"""Local training in PyTorch from the current global parameters (FedAvg, or FedProx with mu > 0)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fibemrss.model_params import flatten, layer_shapes, unflatten
from fibemrss.task_spec import HyperParameters

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and cores are shared


def _module(shapes: list[tuple[int, int]]) -> nn.Sequential:
    parts: list[nn.Module] = []
    for k, (out_dim, in_dim) in enumerate(shapes):
        parts.append(nn.Linear(in_dim, out_dim))
        if k < len(shapes) - 1:
            parts.append(nn.ReLU())
    return nn.Sequential(*parts)


def train_local(
    model: str, global_params: np.ndarray, x: np.ndarray, y: np.ndarray, hyper: HyperParameters, seed: int
) -> np.ndarray:
    """Trains from `global_params` on (x, y) and returns the new flat parameter vector."""
    shapes = layer_shapes(model, x.shape[1])
    net = _module(shapes)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(linears, unflatten(global_params, shapes), strict=True):
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
    anchor = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=hyper.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(hyper.local_epochs):
        order = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(order), hyper.batch_size):
            idx = order[start : start + hyper.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(net(xt[idx]).squeeze(1), yt[idx])
            if hyper.proximal_mu > 0:
                # FedProx: keep local parameters near the global ones on non-IID hospitals.
                loss = loss + 0.5 * hyper.proximal_mu * sum(
                    ((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor, strict=True)
                )
            loss.backward()
            optimizer.step()
    return flatten([(lin.weight.detach().numpy(), lin.bias.detach().numpy()) for lin in linears])
