"""Local training in PyTorch from the current global parameters (FedAvg, or FedProx with mu > 0)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fibemrss.domain.task_spec import HyperParameters
from fibemrss.domain.torch_models import build_module, load_vector, vector_of

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and cores are shared


def train_local(
    model: str, global_params: np.ndarray, x: np.ndarray, y: np.ndarray, hyper: HyperParameters, seed: int
) -> np.ndarray:
    """Trains from `global_params` on (x, y) and returns the new flat parameter vector."""
    net = build_module(model, x.shape[1])
    load_vector(net, global_params)
    net.train()
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
            loss = loss_fn(net(xt[idx]).reshape(len(idx), -1)[:, 0], yt[idx])
            if hyper.proximal_mu > 0:
                # FedProx: keep local parameters near the global ones on non-IID hospitals.
                loss = loss + 0.5 * hyper.proximal_mu * sum(
                    ((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor, strict=True)
                )
            loss.backward()
            optimizer.step()
    return vector_of(net)
