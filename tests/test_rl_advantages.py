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


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [1.2, 1.05, 1.3, 0.1, 1e6 + 0.1])
def test_equal_rewards_give_exactly_zero_advantage(kind, value):
    # float32 group means of non-dyadic rewards round; that error over std + eps was ~0.1 for every member.
    alone = compute_advantages(torch.full((8,), value), 8, kind)
    assert torch.equal(alone, torch.zeros(8))
    mixed = compute_advantages(torch.cat([torch.full((8,), value), torch.tensor([0.0, 1.2] * 4)]), 8, kind)
    assert torch.equal(mixed[:8], torch.zeros(8))
    assert mixed[8:].abs().min() > 0


def test_format_weight_rewards_of_an_all_correct_group_do_not_push_the_policy():
    from nested_reft_ds.reward import score_batch

    # Every completion correct and boxed: 1 + format_weight each, a group with nothing to learn from.
    rewards = torch.tensor(score_batch([r"so \boxed{4}"] * 8, ["4"] * 8, format_weight=0.2))
    assert rewards.tolist() == pytest.approx([1.2] * 8)
    assert torch.equal(grpo_advantages(rewards, 8), torch.zeros(8))


def test_advantages_are_float32_whatever_the_reward_dtype():
    assert compute_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), 2, "grpo").dtype == torch.float32
