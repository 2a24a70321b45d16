"""`engine.optimizer_step`: the global gradient norm before clipping, at the accumulation boundary only, also at
ZeRO-0 in fp32, where DeepSpeed clips without keeping the norm (a real single-process DeepSpeed engine)."""
import os

import pytest


@pytest.fixture(scope="module")
def engine():
    import torch
    from torch import nn

    from nested_reft_ds import engine as ds

    environ = dict(os.environ)  # init_distributed exports RANK/WORLD_SIZE/...: keep them out of later tests
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "gradient_clipping": 0.01, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    try:
        ds.init_distributed()
        torch.manual_seed(0)
        yield ds.build_engine(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), config)
    finally:
        ds.shutdown_distributed()
        os.environ.clear()
        os.environ.update(environ)


def test_norm_is_the_accumulated_gradients_before_clipping_and_only_at_the_boundary(engine):
    import torch

    from nested_reft_ds.engine import optimizer_step

    inputs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    # The expected norm: the same two micro-batches' loss on a copy of the module, DeepSpeed's 1/accum included.
    reference = [p.detach().clone().requires_grad_() for p in engine.module.parameters()]
    w1, b1, w2, b2 = reference
    total = sum((torch.tanh(x @ w1.T + b1) @ w2.T + b2).pow(2).mean() / 2 for x in inputs)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in torch.autograd.grad(total, reference)])).item()
    assert expected > 0.01, "large enough that clipping at 0.01 changes the gradients"

    norms = []
    for x in inputs:
        engine.backward(engine(x).pow(2).mean())
        norms.append(optimizer_step(engine))
    assert norms[0] is None, "no optimizer step before the boundary"
    assert norms[1] == pytest.approx(expected, rel=1e-5)
