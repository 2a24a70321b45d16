"""Checkpoint retention (`train.keep_checkpoints`): older tags go only after a newer one is committed, never the one
`latest` names; a save that crashed before its commit is never chosen and is cleaned up.

The directory logic is tested on plain directories; a real single-process DeepSpeed engine (world size 1, ZeRO
stage 0) checks that save_checkpoint(keep=2) leaves exactly the last two tags and that loading still works."""
import os
from pathlib import Path

import pytest

from nested_reft_ds.config import ConfigError, load_config
from nested_reft_ds.engine.checkpoint import (COMMITTED, _commit, clear_tag, committed_tags, latest_tag,
                                              prune_checkpoints, tag_order)


def make(save_dir: Path, *tags: str) -> None:
    for tag in tags:
        (save_dir / tag).mkdir(parents=True)
        (save_dir / tag / "mp_rank_00_model_states.pt").write_text(tag)


def dirs(save_dir: Path) -> set[str]:
    return {p.name for p in save_dir.iterdir() if p.is_dir()}


def test_tags_order_sft_before_rl_by_step():
    tags = ["rl_step10", "sft_step600", "rl_step9", "rl_step100", "sft_step50"]
    assert sorted(tags, key=tag_order) == ["sft_step50", "sft_step600", "rl_step9", "rl_step10", "rl_step100"]
    assert tag_order("final") is None and tag_order("rl_step10.tmp") is None


def test_keep_follows_commit_order_and_never_removes_latest(tmp_path):
    make(tmp_path, "sft_step600", "rl_step10", "rl_step20", "rl_step30")
    for tag in ("sft_step600", "rl_step10", "rl_step20", "rl_step30"):
        _commit(tmp_path, tag)
    assert committed_tags(tmp_path) == ["sft_step600", "rl_step10", "rl_step20", "rl_step30"]
    assert prune_checkpoints(tmp_path, keep=2) == ["sft_step600", "rl_step10"]
    assert dirs(tmp_path) == {"rl_step20", "rl_step30"} and latest_tag(tmp_path) == "rl_step30"
    assert (tmp_path / COMMITTED).read_text().split() == ["rl_step20", "rl_step30"]
    # Commit order, not name order: a fresh run reusing the directory commits rl_step5 after rl_step30.
    make(tmp_path, "rl_step5")
    _commit(tmp_path, "rl_step5")
    assert prune_checkpoints(tmp_path, keep=2) == ["rl_step20"]
    assert dirs(tmp_path) == {"rl_step30", "rl_step5"}
    # `latest` survives even where it is not among the last `keep` of the list.
    (tmp_path / "latest").write_text("rl_step30")
    assert prune_checkpoints(tmp_path, keep=1) == [] and dirs(tmp_path) == {"rl_step30", "rl_step5"}


def test_keep_zero_keeps_every_committed_tag_but_not_a_crashed_save(tmp_path):
    make(tmp_path, "rl_step1", "rl_step2", "rl_step3")
    for tag in ("rl_step1", "rl_step2"):
        _commit(tmp_path, tag)
    (tmp_path / "final").mkdir()  # not a training-loop tag: never touched
    assert prune_checkpoints(tmp_path, keep=0) == ["rl_step3"]  # written, never committed
    assert dirs(tmp_path) == {"rl_step1", "rl_step2", "final"}


def test_a_crash_between_commit_and_list_rewrite_is_healed(tmp_path):
    make(tmp_path, "rl_step1", "rl_step2")
    _commit(tmp_path, "rl_step1")
    (tmp_path / "latest").write_text("rl_step2")  # committed; the crash came before the list was rewritten
    assert committed_tags(tmp_path) == ["rl_step1", "rl_step2"]
    assert prune_checkpoints(tmp_path, keep=1) == ["rl_step1"] and dirs(tmp_path) == {"rl_step2"}


def test_a_directory_from_before_the_list_is_read_in_tag_order_up_to_latest(tmp_path):
    make(tmp_path, "sft_step600", "rl_step10", "rl_step20", "rl_step30", "rl_step40")
    (tmp_path / "latest").write_text("rl_step30")  # rl_step40: a save that crashed before its commit
    assert committed_tags(tmp_path) == ["sft_step600", "rl_step10", "rl_step20", "rl_step30"]
    assert prune_checkpoints(tmp_path, keep=2) == ["sft_step600", "rl_step10", "rl_step40"]
    assert dirs(tmp_path) == {"rl_step20", "rl_step30"}


def test_rewriting_the_latest_tag_moves_latest_back_first(tmp_path):
    make(tmp_path, "rl_step1", "rl_step2")
    _commit(tmp_path, "rl_step1")
    _commit(tmp_path, "rl_step2")
    clear_tag(tmp_path, "rl_step2")  # a crash while rl_step2 is rewritten must find `latest` on rl_step1
    assert latest_tag(tmp_path) == "rl_step1" and committed_tags(tmp_path) == ["rl_step1"]
    assert dirs(tmp_path) == {"rl_step1"}
    clear_tag(tmp_path, "rl_step1")
    assert latest_tag(tmp_path) is None and committed_tags(tmp_path) == []


def test_keep_checkpoints_is_validated():
    assert load_config(None, []).train.keep_checkpoints == 3
    assert load_config(None, ["train.keep_checkpoints=0"]).train.keep_checkpoints == 0
    with pytest.raises(ConfigError, match=r"config key 'train.keep_checkpoints' has invalid value -1: expected an "
                                          r"integer >= 0"):
        load_config(None, ["train.keep_checkpoints=-1"])


# ------------------------------------------------------------------------------------- real DeepSpeed engine

@pytest.fixture(scope="module")
def engines():
    """Two single-process ZeRO-0 DeepSpeed engines over the same tiny module shape (saver, loader)."""
    import torch
    from torch import nn

    from nested_reft_ds import engine as ds

    environ = dict(os.environ)  # init_distributed exports RANK/WORLD_SIZE/...: keep them out of later tests
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    try:
        ds.init_distributed()
        torch.manual_seed(0)
        built = [ds.build_engine(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), config)
                 for _ in range(2)]
        yield built
    finally:
        ds.shutdown_distributed()
        os.environ.clear()
        os.environ.update(environ)


def train_step(engine) -> None:
    import torch

    loss = engine(torch.ones(2, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def test_save_with_keep_leaves_the_last_two_and_loads(engines, tmp_path):
    import torch

    from nested_reft_ds import engine as ds
    from nested_reft_ds.fingerprint import read_fingerprint

    saver, loader = engines
    save_dir = tmp_path / "checkpoints"
    tags = ["sft_step4", "rl_step1", "rl_step2", "rl_step3", "rl_step4"]
    for step, tag in enumerate(tags):
        train_step(saver)
        ds.save_checkpoint(saver, save_dir, tag, {"progress": {"step": step}}, keep=2,
                           fingerprint={"model.layers": 2, "step": step})
    assert dirs(save_dir) == {"rl_step3", "rl_step4"}
    assert latest_tag(save_dir) == "rl_step4" and committed_tags(save_dir) == ["rl_step3", "rl_step4"]
    assert read_fingerprint(save_dir / "rl_step4") == {"model.layers": 2, "step": 4}

    state = ds.load_checkpoint(loader, save_dir, fingerprint={"model.layers": 2, "step": 4})
    assert state["progress"] == {"step": 4}
    for mine, theirs in zip(loader.module.parameters(), saver.module.parameters()):
        assert torch.equal(mine, theirs)
    # Another shape is refused before DeepSpeed reads a byte, in one line naming the key and both values.
    with pytest.raises(ConfigError, match=r"cannot resume from .*rl_step4: model.layers was 2, now 3 \(start afresh"):
        ds.load_checkpoint(loader, save_dir, fingerprint={"model.layers": 3, "step": 4})


def test_a_save_that_crashed_before_its_commit_is_never_loaded_and_is_cleaned(engines, tmp_path):
    import torch

    from nested_reft_ds import engine as ds

    saver, loader = engines
    save_dir = tmp_path / "checkpoints"
    train_step(saver)
    ds.save_checkpoint(saver, save_dir, "rl_step1", {"progress": 1}, keep=1)
    committed = [p.detach().clone() for p in saver.module.parameters()]
    # The crash: rl_step2's shards are on disk, `latest` was never moved.
    train_step(saver)
    saver.save_checkpoint(str(save_dir), tag="rl_step2", client_state={"progress": 2}, save_latest=False)
    assert latest_tag(save_dir) == "rl_step1"
    assert ds.load_checkpoint(loader, save_dir)["progress"] == 1
    for mine, saved in zip(loader.module.parameters(), committed):
        assert torch.equal(mine, saved)
    # The next commit (keep=1) removes both the previous tag and the crashed one.
    train_step(saver)
    ds.save_checkpoint(saver, save_dir, "rl_step3", {"progress": 3}, keep=1)
    assert dirs(save_dir) == {"rl_step3"} and latest_tag(save_dir) == "rl_step3"
