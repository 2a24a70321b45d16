"""The embedded task: seeded, difficulty knobs respected, worked solutions verify; batches are pure functions."""
import re

import pytest

from nested_reft_ds.config import DataConfig
from nested_reft_ds.data import problems_from_config, synthetic_problems
from nested_reft_ds.reward import score_batch
from nested_reft_ds.recipes.batching import batch_indices, local_share


def test_seeded_and_solutions_are_correct():
    problems = synthetic_problems(200, seed=5, min_operand=1, max_operand=9, min_steps=1, max_steps=3)
    assert problems == synthetic_problems(200, seed=5, min_operand=1, max_operand=9, min_steps=1, max_steps=3)
    assert problems != synthetic_problems(200, seed=6, min_operand=1, max_operand=9, min_steps=1, max_steps=3)
    assert score_batch([p.solution for p in problems], [p.answer for p in problems]) == [1.0] * 200
    for p in problems:
        numbers = [int(n) for n in re.findall(r"\d+", p.question)]
        assert all(1 <= n <= 9 for n in numbers)
        assert 1 <= len(re.findall(r"gets|gives away", p.question)) <= 3
        assert int(p.answer) >= 0


def test_train_and_eval_streams_differ():
    train, held_out = problems_from_config(DataConfig(num_problems=300, eval_problems=50), seed=0)
    assert len(train) == 300 and len(held_out) == 50
    assert not {p.question for p in held_out} <= {p.question for p in train}


def test_imperfect_demonstrator_errs_at_its_rate_and_keeps_true_answers():
    knobs = dict(min_operand=1, max_operand=9, min_steps=1, max_steps=2)
    clean = synthetic_problems(2000, seed=3, **knobs)
    noisy = synthetic_problems(2000, seed=3, solution_error_rate=0.6, **knobs)
    assert [p.question for p in noisy] == [p.question for p in clean], "the problems do not depend on the rate"
    assert [p.answer for p in noisy] == [p.answer for p in clean], "references stay true"
    wrong = [p for p in noisy if score_batch([p.solution], [p.answer]) == [0.0]]
    assert 0.55 < len(wrong) / len(noisy) < 0.65
    for p in wrong:  # off by one in the last step, consistently in the equation and the box
        *_, last = re.findall(r"=(\d+)\.", p.solution)
        assert int(last) == int(p.answer) + 1 and p.solution.endswith(f"\\boxed{{{int(p.answer) + 1}}}")
    train, held_out = problems_from_config(DataConfig(num_problems=50, eval_problems=50, solution_error_rate=1.0),
                                           seed=0)
    assert score_batch([p.solution for p in held_out], [p.answer for p in held_out]) == [1.0] * 50
    assert score_batch([p.solution for p in train], [p.answer for p in train]) == [0.0] * 50


def test_bad_knobs_are_rejected():
    with pytest.raises(ValueError, match="operands"):
        synthetic_problems(5, 0, min_operand=10, max_operand=2)


def test_batches_are_pure_cover_each_epoch_and_split_across_ranks():
    batches = [batch_indices(10, 4, step, seed=1) for step in range(5)]
    assert batches == [batch_indices(10, 4, step, seed=1) for step in range(5)]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert local_share([0, 1, 2, 3], 0, 2) + local_share([0, 1, 2, 3], 1, 2) == [0, 1, 2, 3]


def test_long_tailed_chains_follow_the_geometric_step_count():
    knobs = dict(min_operand=1, max_operand=99, min_steps=2, max_steps=20)
    problems = synthetic_problems(4000, seed=2, step_continue_probability=0.7, **knobs)
    steps = [len(re.findall(r"gets|gives away", p.question)) for p in problems]
    assert min(steps) == 2 and max(steps) <= 20
    # min_steps + Geometric(0.7) capped at 20: mean 2 + 0.7 / 0.3 (less the cap's share), P(steps >= 10) = 0.7**8
    assert abs(sum(steps) / len(steps) - (2 + 0.7 / 0.3)) < 0.15
    assert abs(sum(s >= 10 for s in steps) / len(steps) - 0.7**8) < 0.015
    assert score_batch([p.solution for p in problems], [p.answer for p in problems]) == [1.0] * len(problems)
    uniform = synthetic_problems(4000, seed=2, **knobs)
    assert len({len(re.findall(r"gets|gives away", p.question)) for p in uniform}) == 19
    with pytest.raises(ValueError, match="step_continue_probability"):
        synthetic_problems(5, 0, step_continue_probability=1.0)
    with pytest.raises(ValueError, match="data.step_continue_probability"):
        DataConfig(step_continue_probability=-0.1)


def test_step_labels_pair_each_sentence_with_its_solution_line():
    knobs = dict(min_operand=1, max_operand=9, min_steps=2, max_steps=16, step_continue_probability=0.75,
                 solution_error_rate=0.6)
    plain = synthetic_problems(500, seed=4, **knobs)
    labelled = synthetic_problems(500, seed=4, step_labels=True, **knobs)
    assert [p.answer for p in labelled] == [p.answer for p in plain], "labels change the text, not the problems"
    for p, q in zip(labelled, plain):
        assert re.sub(r"\([a-z]\) ", "", p.question) == q.question
        assert re.sub(r"\([a-z]\) ", "", p.solution) == q.solution  # the demonstrator's mistakes too
        letters = re.findall(r"\(([a-z])\)", p.question)
        assert letters == list("abcdefghijklmnopqrstuvwxyz"[:len(letters)])
        assert re.findall(r"\(([a-z])\)", p.solution) == letters
        # the operand a solution line uses is the one its label marks in the question
        for letter, operand in re.findall(r"\(([a-z])\) \d+[+-](\d+)=", p.solution):
            assert re.search(rf"\({letter}\) \w+ (?:gets|gives away) {operand}\b", p.question)
    with pytest.raises(ValueError, match="max_steps"):
        synthetic_problems(5, 0, max_steps=27, step_labels=True)
    with pytest.raises(ValueError, match="data.max_steps"):
        DataConfig(max_steps=30, step_labels=True)
    train, _ = problems_from_config(DataConfig(num_problems=5, eval_problems=0, step_labels=True), seed=0)
    assert all(p.question.count("(a)") == 1 for p in train)


def test_restated_solutions_repeat_each_step_before_its_arithmetic():
    knobs = dict(min_operand=1, max_operand=9, min_steps=2, max_steps=7, step_continue_probability=0.6,
                 solution_error_rate=0.6)
    for labels in (False, True):
        terse = synthetic_problems(300, seed=3, step_labels=labels, **knobs)
        restated = synthetic_problems(300, seed=3, step_labels=labels, restate_steps=True, **knobs)
        assert [(p.question, p.answer) for p in restated] == [(p.question, p.answer) for p in terse]
        for p, q in zip(restated, terse):
            sentences = re.findall(r"[^.?]+[.?]", p.question)
            steps = [s.strip()[:-1] for s in sentences[1:-1]]
            assert p.solution.startswith(sentences[0] + " "), "opens with the starting count, verbatim"
            lines = re.findall(r" ((?:\([a-z]\) )?\w+ (?:gets \d+ more|gives away \d+)): (\d+[+-]\d+=\d+\.)",
                               p.solution)
            assert [step for step, _ in lines] == steps, "each line repeats its step's sentence"
            # the same arithmetic, the demonstrator's off-by-one mistakes included
            assert [arithmetic for _, arithmetic in lines] == re.findall(r"\d+[+-]\d+=\d+\.", q.solution)
            assert p.solution.endswith(q.solution[q.solution.index("\\boxed"):]), "same final answer shown"
    train, _ = problems_from_config(DataConfig(num_problems=5, eval_problems=0, restate_steps=True), seed=0)
    assert all(p.solution.startswith(p.question.split(".")[0] + ".") for p in train)


def test_chain_error_classes():
    from chain_errors import first_error  # benchmarks/chain_errors.py

    question = "Ann has 7 pens. (a) Ann gets 5 more. (b) Ann gives away 3. How many pens does Ann have?"
    assert first_error(question, "(a) 7+5=12. (b) 12-3=9. \\boxed{9}") == "correct"
    assert first_error(question, "(a) 7+5=12. (b) 12-3=10. \\boxed{10}") == "off_by_one_last"
    assert first_error(question, "(a) 7+5=13. (b) 13-3=10. \\boxed{10}") == "arith"
    assert first_error(question, "(a) 7+5=12. (b) 12-4=8. \\boxed{8}") == "operand"
    assert first_error(question, "(a) 7+5=12. (b) 12+3=15. \\boxed{15}") == "operand"
    assert first_error(question, "(a) 7+5=12. (b) 11-3=8. \\boxed{8}") == "carry"
    assert first_error(question, "(a) 7+5=12. \\boxed{12}") == "format"
    restated = "Ann has 7 pens. (a) Ann gets 5 more: 7+5=12. (b) Ann gives away 3: 12-3=9. \\boxed{9}"
    assert first_error(question, restated) == "correct"
    assert first_error(question, restated.replace("5 more: 7+5", "4 more: 7+4")) == "copy"
    assert first_error(question, restated.replace("5 more: 7+5", "5 more: 7+4")) == "operand"
    assert first_error(question, restated.replace("7+5", "6+5")) == "carry"
    # The starting count restated wrong and used consistently is a failed copy, not a wrong running total.
    assert first_error(question, restated.replace("has 7", "has 6").replace("7+5=12", "6+5=11")
                       .replace("12-3=9", "11-3=8")) == "copy"
    for problem in [*synthetic_problems(200, seed=1, max_steps=8, solution_error_rate=0.5, step_labels=True),
                    *synthetic_problems(200, seed=1, max_steps=8, solution_error_rate=0.5, restate_steps=True)]:
        expected = "correct" if score_batch([problem.solution], [problem.answer]) == [1.0] else "off_by_one_last"
        assert first_error(problem.question, problem.solution) == expected
