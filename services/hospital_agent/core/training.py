"""Local training in PyTorch from the current global parameters (FedAvg, or FedProx with mu > 0),
without or with patient-level differential privacy (DP-SGD)."""

from __future__ import annotations

import secrets

import numpy as np
import torch
from torch import nn

from fibemrss.domain.task_spec import DpSpec, HyperParameters
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


def os_generator() -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS's CSPRNG (`secrets`): nothing public
    (no round number, no seed a caller or an observer knows) can replay what it draws."""
    return torch.Generator().manual_seed(secrets.randbits(64))


_UNIT = 2**53  # uniform draws of 53 bits, as many as a float64 holds


def poisson_sample(n: int, rate: float) -> torch.Tensor:
    """A boolean mask over n rows, each row included independently with probability `rate`
    (Poisson sampling, as Opacus' UniformWithReplacementSampler), drawn straight from the OS's
    CSPRNG (8 bytes per row): the batch, and so its size, is as secret as the accountant's
    subsampling amplification assumes."""
    draws = np.frombuffer(secrets.token_bytes(8 * n), dtype=np.uint64) >> np.uint64(11)
    return torch.from_numpy(draws < np.uint64(round(rate * _UNIT)))


def train_local_dp(
    model: str,
    global_params: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    hyper: HyperParameters,
    dp: DpSpec,
    noise_multiplier: float,
    steps: int,
    round_number: int | None = None,
) -> np.ndarray:
    """DP-SGD from `global_params`: `steps` steps, each a Poisson sample of rate dp.sample_rate
    (`poisson_sample`), per-example gradients clipped to dp.max_grad_norm, summed, Gaussian noise of
    standard deviation noise_multiplier x max_grad_norm added, divided by the EXPECTED batch size
    q n (never by the sampled one, whose size would itself leak; Opacus does the same), and an
    SGD step. This is the mechanism `fibemrss.domain.privacy_accounting` accounts: `steps` steps of
    the Poisson-subsampled Gaussian of rate q, so callers pass its `steps_per_round` and
    `noise_multiplier`. Both the batches and the noise come from the OS's randomness:
    `round_number` is accepted for the caller's sake and never seeds anything (a public seed
    would let anyone who knows a patient's row replay which steps saw it, and the
    amplification by subsampling would not hold). FedProx's proximal term touches no example, so
    it is added after the noise."""
    del round_number  # deliberately unused: see above
    net = build_module(model, x.shape[1])
    load_vector(net, global_params)
    net.train()
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    anchor = {n: p.clone() for n, p in params.items()}
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32))
    loss_fn = nn.BCEWithLogitsLoss()

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logit = torch.func.functional_call(net, p, (xi.unsqueeze(0),)).reshape(-1)[0]
        return loss_fn(logit, yi)

    per_example_grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))
    noise = os_generator()
    expected_batch = max(dp.sample_rate * len(yt), 1.0)
    clip = dp.max_grad_norm
    for _ in range(steps):
        chosen = poisson_sample(len(yt), dp.sample_rate)
        summed = {n: torch.zeros_like(p) for n, p in params.items()}
        if chosen.any():
            grads = per_example_grads(params, xt[chosen], yt[chosen])
            norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
            scale = (clip / (norms + 1e-12)).clamp(max=1.0)
            for n in names:
                summed[n] = (grads[n] * scale.reshape(-1, *([1] * (grads[n].dim() - 1)))).sum(0)
        # An empty sample still takes its step: noise alone, as the accountant counts it.
        with torch.no_grad():
            for n in names:
                noisy = summed[n] + torch.normal(
                    0.0, noise_multiplier * clip, summed[n].shape, generator=noise
                )
                step = noisy / expected_batch
                if hyper.proximal_mu > 0:
                    step = step + hyper.proximal_mu * (params[n] - anchor[n])
                params[n] = params[n] - hyper.learning_rate * step
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(params[n])
    return vector_of(net)
