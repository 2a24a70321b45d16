"""RunLog: a resumed run holds each step exactly once (metrics.jsonl and TensorBoard), one progress bar per phase
advancing every step, and silence on non-zero ranks."""
import json

import pytest

from nested_reft_ds.run_log import RunLog, truncate_metrics


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(out, phase, key):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard" / phase))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(f"{phase}/{key}")]


def crashed_then_resumed(out, resume_at, first_sft, first_rl, second_sft, second_rl):
    """Run 1 logs sft/rl/eval steps (value 1.0) and dies without closing; run 2 resumes at `resume_at` (value 2.0)."""
    first = RunLog(out, True, tensorboard=True, progress_bar=False)
    for step in first_sft:
        first.log(step, {"sft_loss": 1.0}, phase="sft")
    for step in first_rl:
        first.log(step, {"loss": 1.0})
        if step % 2 == 0:
            first.log(step, {"heldout_accuracy": 1.0}, phase="eval")
    for writer in first.writers.values():
        writer.flush()  # what a crash leaves on disk: everything already written, no close
    second = RunLog(out, True, tensorboard=True, progress_bar=False, resume_at=resume_at)
    for step in second_sft:
        second.log(step, {"sft_loss": 2.0}, phase="sft")
    for step in second_rl:
        second.log(step, {"loss": 2.0})
        if step % 2 == 0:
            second.log(step, {"heldout_accuracy": 2.0}, phase="eval")
    second.close()
    first.close()


def test_resume_in_rl_keeps_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    # Checkpoint at rl_step 4 (warm-up of 3 steps done); the crash came after rl step 6 was logged.
    crashed_then_resumed(tmp_path, (3, 4), range(3), range(7), [], range(4, 8))
    logged = [(r["phase"], r["step"], r.get("loss", r.get("sft_loss", r.get("heldout_accuracy"))))
              for r in records(tmp_path)]
    assert logged == ([("sft", s, 1.0) for s in range(3)]
                      + [x for s in range(4) for x in [("rl", s, 1.0)] + ([("eval", s, 1.0)] if s % 2 == 0 else [])]
                      + [x for s in range(4, 8) for x in [("rl", s, 2.0)] + ([("eval", s, 2.0)] if s % 2 == 0 else [])])
    assert scalars(tmp_path, "rl", "loss") == [(s, 1.0) for s in range(4)] + [(s, 2.0) for s in range(4, 8)]
    assert scalars(tmp_path, "eval", "heldout_accuracy") == [(0, 1.0), (2, 1.0), (4, 2.0), (6, 2.0)]
    assert scalars(tmp_path, "sft", "sft_loss") == [(s, 1.0) for s in range(3)]


def test_resume_in_the_warm_up_hides_only_the_warm_up_steps_after_the_checkpoint(tmp_path):
    # RL step numbers restart at 0 and SFT ones do not: one purge step per phase.
    crashed_then_resumed(tmp_path, (2, 0), range(5), [], range(2, 5), range(2))
    assert scalars(tmp_path, "sft", "sft_loss") == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0), (4, 2.0)]
    assert scalars(tmp_path, "rl", "loss") == [(0, 2.0), (1, 2.0)]
    assert [(r["phase"], r["step"]) for r in records(tmp_path)] == \
        [("sft", 0), ("sft", 1), ("sft", 2), ("sft", 3), ("sft", 4), ("rl", 0), ("eval", 0), ("rl", 1)]


def test_truncation_drops_a_line_cut_off_by_the_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"phase": "rl", "step": 0, "loss": 1}\n{"phase": "other", "step": 99}\n{"phase": "rl", "st')
    assert truncate_metrics(path, (0, 1)) == 1
    assert path.read_text() == '{"phase": "rl", "step": 0, "loss": 1}\n{"phase": "other", "step": 99}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # rewritten in place, no temp file left


def test_one_bar_per_phase_advances_every_step_with_rate_and_eta(tmp_path, capsys):
    run_log = RunLog(tmp_path, True, tensorboard=False, progress_bar=True, resume_at=(3, 0))
    run_log.start_phase("warm-up", total=5, done=3)
    assert run_log.bar.n == 3 and run_log.bar.total == 5
    run_log.step_done()  # an unlogged step still moves the bar
    run_log.log(4, {"sft_loss": 0.5}, phase="sft")
    run_log.step_done()
    assert run_log.bar.n == 5
    run_log.start_phase("rl", total=4, done=0)
    assert run_log.bar.desc == "rl" and run_log.bar.n == 0
    for _ in range(2):
        run_log.step_done()
    meter = str(run_log.bar)
    assert "2/4" in meter and ("step/s" in meter or "s/step" in meter)
    assert "<" in meter  # elapsed<remaining: the ETA
    run_log.close()
    captured = capsys.readouterr()
    assert "[sft 4] sft loss 0.5000" in captured.out
    assert "warm-up" in captured.err and "rl" in captured.err


def test_no_bar_when_disabled_or_nothing_is_left(tmp_path, capsys):
    run_log = RunLog(tmp_path, True, tensorboard=False, progress_bar=False)
    run_log.start_phase("rl", total=3)
    run_log.step_done()
    run_log.log(0, {"loss": 0.25})
    run_log.start_phase("warm-up", total=2, done=2)
    assert run_log.bar is None
    run_log.step_done()  # harmless
    run_log.close()
    captured = capsys.readouterr()
    assert captured.out == "[rl 0] loss +0.2500\n" and captured.err == ""


@pytest.mark.parametrize("prefix", [None, "[rank 1] "])
def test_non_zero_ranks_write_nothing_and_print_only_with_all_ranks(tmp_path, capsys, prefix):
    run_log = RunLog(tmp_path / "out", False, tensorboard=True, progress_bar=True, resume_at=(0, 5), echo_prefix=prefix)
    run_log.start_phase("rl", total=10, done=5)
    run_log.step_done()
    run_log.log(5, {"loss": 0.5})
    run_log.message("hello")
    run_log.close()
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ("" if prefix is None else "[rank 1] [rl 5] loss +0.5000\n")
    assert not (tmp_path / "out").exists()
