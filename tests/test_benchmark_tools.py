"""The diagnostics in benchmarks/ that docs/results/ are made with."""
import gzip
import json


def test_warmup_loss_keeps_full_model_sft_steps_of_the_chosen_seed(tmp_path):
    from plot_warmup_loss import full_model_loss  # benchmarks/plot_warmup_loss.py

    records = [
        {"arm": "sft", "seed": 1, "phase": "sft", "step": 0, "sft_loss": 2.0, "sft_skipped": 0},
        {"arm": "sft", "seed": 1, "phase": "sft", "step": 1, "sft_loss": 9.0, "sft_skipped": 8},  # LayerDrop step
        {"arm": "sft", "seed": 1, "phase": "sft", "step": 2, "sft_loss": 1.0, "sft_skipped": 0},
        {"arm": "sft", "seed": 1, "phase": "sft", "step": 100, "sft_loss": 0.5, "sft_skipped": 0},
        {"arm": "sft", "seed": 2, "phase": "sft", "step": 0, "sft_loss": 7.0, "sft_skipped": 0},  # another seed
        {"arm": "reft", "seed": 1, "phase": "rl", "step": 0, "loss": 3.0},
    ]
    grid = tmp_path / "runs.jsonl.gz"
    with gzip.open(grid, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert full_model_loss(grid, seed=1) == ([0, 100], [1.5, 0.5])
    assert full_model_loss(grid, seed=2) == ([0], [7.0])
    single = tmp_path / "metrics.jsonl"
    single.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("arm", "seed")}) + "\n"
                              for r in records[:4]))
    assert full_model_loss(single, seed=None) == ([0, 100], [1.5, 0.5])
