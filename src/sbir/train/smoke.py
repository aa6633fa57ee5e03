"""A tiny but real training loop (linear regression on synthetic data) that exercises the whole
runtime: sharded batches, gradient sync across workers, per-epoch reports, checkpoints, resume and
rank-0 MLflow logging (through ``rt.report``). Used by tests/test_runtime.py and tests/test_fault_tolerance.py."""
from __future__ import annotations

import torch

from sbir.train import runtime as rt


def make_data(n: int = 512, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return x, x @ w + 0.01 * torch.randn(n, 1, generator=g), w


def regression_loop(config: dict) -> None:
    rt.setup_worker(config)
    x, y, _ = make_data(config.get("n", 512), config.get("dim", 8))
    torch.manual_seed(config.get("seed", 0))  # same initial weights on every worker and every run
    model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.1))
    state = rt.restore_into(model=model, optimizer=opt)
    start = state["epoch"] + 1 if state else 0
    rt.broadcast_module(model)
    for epoch in range(start, config.get("epochs", 3)):
        total, steps = 0.0, 0
        for idx in rt.shard_indices(len(x), config.get("batch_size", 32), epoch, seed=0):
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            rt.check_finite({"mse": loss}, epoch, "smoke")
            opt.zero_grad()
            loss.backward()
            rt.sync_gradients(model)
            opt.step()
            total, steps = total + loss.item(), steps + 1
        metrics = rt.mean_over_workers({"mse": total / steps})
        metrics.update(epoch=epoch, world_size=rt.world()[1], resumed_from=start)
        rt.report(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch})
