"""nested_reft_ds.rl is pure PyTorch: importable and usable with deepspeed blocked and torch.distributed banned."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["deepspeed"] = None  # any `import deepspeed` now raises ImportError
    import torch
    import torch.distributed as dist

    def banned(*args, **kwargs):
        raise AssertionError("torch.distributed used")

    for name in ("init_process_group", "is_initialized", "get_rank", "get_world_size", "all_reduce",
                 "all_gather", "broadcast", "barrier", "reduce", "all_gather_object"):
        setattr(dist, name, banned)

    import dataclasses
    from nested_reft_ds.config import AlgorithmConfig
    from nested_reft_ds.rl import compute_advantages, importance_weights, policy_loss, token_logprobs
    from nested_reft_ds.nested.controller import AdaptiveSkipController, LayerCostTracker

    logits = torch.randn(4, 5, 11)
    tokens = torch.randint(0, 11, (4, 5))
    logp = token_logprobs(logits.requires_grad_(), tokens)
    prox = logp.detach()
    adv = compute_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "rloo")
    for correction in ("none", "seq_is", "token_tis", "token_mis", "seq_mis"):
        cfg = AlgorithmConfig(correction=correction)
        loss, metrics = policy_loss(logp, prox, prox - 0.1, adv, torch.ones(4, 5), cfg,
                                    num_global_tokens=20, num_global_seqs=4)
        loss.backward(retain_graph=True)
    controller = AdaptiveSkipController(0.25, 0.0, 0.5, target_ess=0.8)
    controller.update(ess=metrics["ess_seq_raw"], kl=metrics["kl_behavior_k3"])
    tracker = LayerCostTracker(6)
    tracker.update((1, 2), metrics["kl_behavior_k3"])
    tracker.sampling_weights(protected=(0, 5))
    assert "deepspeed" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
    print("ok")
""")


def test_rl_and_controller_import_without_deepspeed_or_torch_distributed():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_sources_do_not_import_deepspeed_or_torch_distributed():
    use = re.compile(r"^\s*(import|from)\s+(deepspeed|torch\.distributed)\b|torch\.distributed\.\w|\bdist\.\w", re.M)
    files = list((ROOT / "nested_reft_ds" / "rl").glob("*.py")) + [ROOT / "nested_reft_ds/nested/controller.py"]
    for path in files:
        assert not use.search(path.read_text()), path
