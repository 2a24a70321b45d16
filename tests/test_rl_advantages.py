import pytest
import torch

from nested_reft_ds.rl import compute_advantages, grpo_advantages

REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # two groups of 4; the second is all-equal


def test_grpo_hand_computed():
    # group 1: mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5
    adv = grpo_advantages(REWARDS, 4)
    expected = torch.tensor([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]) / (0.5 + 1e-6)  # ~ [.5, -1.5, .5, .5, 0...]
    torch.testing.assert_close(adv, expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group gets exactly 0
    torch.testing.assert_close(compute_advantages(REWARDS, 4, "grpo"), adv)


def test_dr_grpo_and_rloo_hand_computed():
    torch.testing.assert_close(compute_advantages(REWARDS, 4, "dr_grpo"),
                               torch.tensor([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]))
    # leave-one-out: 1 - mean(0, 1, 1) = 1/3, 0 - mean(1, 1, 1) = -1
    torch.testing.assert_close(compute_advantages(REWARDS, 4, "rloo"),
                               torch.tensor([1 / 3, -1.0, 1 / 3, 1 / 3, 0, 0, 0, 0]))


def test_groups_are_contiguous_rows():
    adv = compute_advantages(torch.tensor([0.0, 1.0, 5.0, 7.0]), 2, "dr_grpo")
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -1.0, 1.0]))


@pytest.mark.parametrize("group_size", [1, 3])
def test_bad_group_size_raises(group_size):
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(REWARDS, group_size)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="ppo"):
        compute_advantages(REWARDS, 4, "ppo")
