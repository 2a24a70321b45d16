"""`nested-reft compare`: the summary math on hand-built records, the job plan, and a --quick grid end to end."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nested_reft_ds.recipes import compare
from nested_reft_ds.recipes.compare import ARMS, BASELINE, DEFAULT_ARMS, CompareConfig
from nested_reft_ds.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "compare_tiny.yaml")
LONG_CONFIG = str(REPO / "configs" / "compare_long.yaml")


def fake_run(step_s: float, rollout_s: float, rollout_tps: float, evals: dict[int, float], steps: int = 4,
             completion_length: float = 10.0):
    """Metrics records of a run: `steps` identical RL steps and held-out evaluations {step: accuracy}."""
    rl = [{"phase": "rl", "step": s, "time_step_s": step_s, "time_rollout_s": rollout_s, "time_reward_s": 0.1,
           "completion_length": completion_length,
           "time_train_s": step_s - rollout_s - 0.1, "rollout_tokens_per_s": rollout_tps, "reward_mean": 0.5,
           "skip_ratio": 0.0, "ess": 1.0, "kl_behavior_k3": 0.0, "frac_truncated": 0.0, "frac_masked": 0.0}
          for s in range(steps)]
    return rl + [{"phase": "eval", "step": s, "heldout_accuracy": a} for s, a in evals.items()]


# ------------------------------------------------------------------------------------------------ pure math

def test_mean_std_is_over_seeds_with_sample_std():
    stat = compare.mean_std([0.5, 0.7, 0.9])
    assert stat["mean"] == pytest.approx(0.7) and stat["std"] == pytest.approx(0.2) and stat["n"] == 3
    assert compare.mean_std([0.4]) == {"mean": 0.4, "std": None, "n": 1}
    assert compare.mean_std([None, 2.0, 4.0])["std"] == pytest.approx(2 ** 0.5), "absent values (None) left out"
    assert compare.mean_std([])["mean"] is None
    assert compare.fmt(compare.mean_std([0.5, 0.7, 0.9]), 3) == "0.700 ± 0.200"
    assert compare.fmt(compare.mean_std([1.25]), 2, "x") == "1.25x"
    assert compare.fmt(compare.mean_std([]), 2) == "–"


def test_eval_curve_places_evaluations_at_cumulative_rl_wall_time():
    records = fake_run(2.0, 1.0, 100.0, {0: 0.1, 2: 0.3, 4: 0.5})
    records[1]["time_step_s"] = 3.0  # steps take 2, 3, 2, 2 s
    assert compare.rl_wall_times(records) == {0: 0.0, 1: 2.0, 2: 5.0, 3: 7.0, 4: 9.0}
    assert compare.eval_curve(records) == ([0, 2, 4], [0.0, 5.0, 9.0], [0.1, 0.3, 0.5])
    assert compare.interpolate([0.0, 5.0, 9.0], [0.1, 0.3, 0.5], 7.0) == pytest.approx(0.4)


def test_run_metrics_are_ratios_of_sums():
    records = fake_run(2.0, 1.0, 100.0, {0: 0.1, 4: 0.5})
    records[0].update(time_rollout_s=3.0, rollout_tokens_per_s=300.0, time_step_s=4.0)  # 900 tokens in 3 s
    metrics = compare.run_metrics(records)
    tokens = 900 + 3 * 100
    assert metrics["rollout_tokens_per_s"] == pytest.approx(tokens / (3 + 3 * 1.0))
    assert metrics["step_tokens_per_s"] == pytest.approx(tokens / (4 + 3 * 2.0))
    assert metrics["rl_wall_s"] == pytest.approx(10.0) and metrics["rl_steps"] == 4
    assert (metrics["initial_accuracy"], metrics["final_accuracy"]) == (0.1, 0.5)
    assert metrics["rollout_share"] == pytest.approx(6.0 / 10.0)
    assert compare.run_metrics(fake_run(2.0, 1.0, 100.0, {0: 0.1, 2: 0.7, 4: 0.5}))["best_accuracy"] == 0.7
    assert metrics["run_cpu_s"] is None, "no runner record"
    assert compare.run_metrics(records + [{"phase": "job", "step": None, "wall_s": 20.0, "cpu_s": 12.5}])[
        "run_cpu_s"] == 12.5


def test_summary_equal_time_accuracy_and_paired_speedup():
    runs = {
        # seed 1: baseline 2 s/step (wall 8), nested 1.5 s/step (wall 6) -> T* = 6
        (BASELINE, 1): fake_run(2.0, 1.0, 100.0, {0: 0.1, 2: 0.3, 4: 0.5}),
        ("skip0.5-token_tis", 1): fake_run(1.5, 0.5, 200.0, {0: 0.1, 2: 0.2, 4: 0.45}),
        # seed 2: baseline 1 s/step (wall 4), nested 0.5 s/step (wall 2) -> T* = 2
        (BASELINE, 2): fake_run(1.0, 0.5, 100.0, {0: 0.2, 4: 0.6}),
        ("skip0.5-token_tis", 2): fake_run(0.5, 0.25, 200.0, {0: 0.2, 4: 0.5}),
    }
    summary = compare.summarize(runs)
    assert summary["equal_time_s"] == {"1": 6.0, "2": 2.0}
    assert list(summary["arms"]) == [BASELINE, "skip0.5-token_tis"], "table in ARMS order"
    base, nested = summary["arms"][BASELINE], summary["arms"]["skip0.5-token_tis"]
    # Baseline at T*: seed 1 between (4 s, 0.3) and (8 s, 0.5) -> 0.4; seed 2 between (0, 0.2) and (4, 0.6) -> 0.4.
    assert base["accuracy_at_equal_time"]["per_seed"] == pytest.approx({"1": 0.4, "2": 0.4})
    # The fastest arm of each seed reports its final accuracy.
    assert nested["accuracy_at_equal_time"]["per_seed"] == pytest.approx({"1": 0.45, "2": 0.5})
    assert nested["final_accuracy"]["mean"] == pytest.approx(0.475)
    assert nested["final_accuracy"]["std"] == pytest.approx(0.025 * 2 ** 0.5)
    # Step tok/s: seed 1 baseline 100 tok / 2 s = 50, nested 100 tok / 1.5 s -> 4/3; seed 2: 50 / 1 vs 50 / 0.5 -> 2.
    assert nested["speedup"]["per_seed"] == pytest.approx({"1": 4 / 3, "2": 2.0})
    assert nested["speedup"]["mean"] == pytest.approx(5 / 3)
    assert base["speedup"]["mean"] == pytest.approx(1.0) and base["speedup"]["std"] == pytest.approx(0.0)
    # The same steps in less time: seed 1 wall 8 s vs 6 s, seed 2 4 s vs 2 s.
    assert nested["wall_speedup"]["per_seed"] == pytest.approx({"1": 4 / 3, "2": 2.0})
    # Bound: baseline rollout share f = 0.5 on both seeds, rollout 200 vs 100 tok/s -> 1 / (0.5 + 0.5 / 2) = 4/3.
    assert nested["speedup_bound"]["per_seed"] == pytest.approx({"1": 4 / 3, "2": 4 / 3})
    assert base["speedup_bound"]["mean"] == pytest.approx(1.0)
    table = compare.markdown_table(summary)
    assert "| skip0.5-token_tis | 0.475 ± 0.035 | 0.475 ± 0.035 |" in table
    assert "1.67x ± 0.47x" in table
    assert "| skip0.5-token_tis | 0.100 / 0.200 | 0.450 / 0.500 | 0.450 / 0.500 | 1.33 / 2.00 | 1.33 / 2.00 | 1.33 / 1.33 |" \
        in compare.per_seed_table(summary)


def test_moving_mean_is_trailing_with_short_windows_at_the_start():
    assert compare.moving_mean([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert compare.moving_mean([5, 1], 1).tolist() == [5.0, 1.0]


def test_speedup_is_absent_without_a_baseline_run():
    runs = {("skip0.25-none", 1): fake_run(1.0, 0.5, 100.0, {0: 0.1, 4: 0.2})}
    stats = compare.summarize(runs)["arms"]["skip0.25-none"]
    assert stats["speedup"]["mean"] is None and "| – |" in compare.markdown_table(compare.summarize(runs))


def with_correct(records: list[dict], vectors: dict[int, str]) -> list[dict]:
    """`records` with each evaluation's per-problem results ("0"/"1" per problem) set from `vectors` {step: ...}."""
    return [{**r, "heldout_correct": vectors[r["step"]]} if r["phase"] == "eval" else r for r in records]


def test_paired_differences_use_the_same_problems_with_a_bootstrap_interval():
    base = with_correct(fake_run(2.0, 1.0, 100.0, {0: 0.0, 4: 0.5}), {0: "0000", 4: "1100"})
    arm = with_correct(fake_run(1.0, 0.5, 200.0, {0: 0.0, 4: 0.75}), {0: "0000", 4: "1110"})
    # No heldout_correct (older records): left out, not an error.
    runs = {(BASELINE, 1): base, ("skip0.5-token_tis", 1): arm, ("skip0.5-none", 1): fake_run(1.0, 0.5, 200.0, {0: 0.0})}
    summary = compare.summarize(runs)
    paired = summary["paired"]
    assert list(paired) == ["skip0.5-token_tis"]
    final = paired["skip0.5-token_tis"]["final"]
    assert final["per_seed"]["1"]["mean"] == pytest.approx(0.25) and final["pooled"]["mean"] == pytest.approx(0.25)
    # One of four problems differs: resampled means are k/4 for k = 0..4; the interval spans 0 to 0.75 at most.
    assert 0.0 <= final["pooled"]["low"] <= 0.25 <= final["pooled"]["high"] <= 0.75
    # Equal time T* = 4 s (the arm's whole run): the baseline is halfway (4 of its 8 s): each problem's result is
    # interpolated, 0.5 * "1100" -> 0.25 accuracy; the arm is at its end, 0.75.
    assert paired["skip0.5-token_tis"]["equal_time"]["pooled"]["mean"] == pytest.approx(0.5)
    table = compare.paired_table(summary)
    assert "| skip0.5-token_tis | +0.250 [" in table
    assert "Paired differences" in compare.markdown_report(summary, {"command": "c", "machine": "m", "parallel": 1,
                                                                     "rl_steps": 4})


def test_bootstrap_pools_seeds_by_resampling_each_seeds_problems():
    rng = np.random.default_rng(0)
    differences = [rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.7, 0.2], size=512) for _ in range(3)]
    pooled = compare.bootstrap_mean(differences)
    assert pooled["mean"] == pytest.approx(np.mean([d.mean() for d in differences]))
    # The standard error of the pooled mean is about sqrt(var / 512 / 3); the 95% interval about 4 of them wide.
    se = np.sqrt(np.mean([d.var() for d in differences]) / 512 / 3)
    assert 3.4 * se < pooled["high"] - pooled["low"] < 4.6 * se
    assert pooled["problems"] == 3 * 512


# ------------------------------------------------------------------------------------------------- grid and plan

def test_grid_has_the_issue_arms():
    assert BASELINE in ARMS and "adaptive-token_tis" in ARMS
    assert {f"skip{r}-{c}" for r in (0.25, 0.5) for c in ("none", "token_tis", "seq_mis")} <= set(ARMS)
    assert {f"spec{r}-g{g}" for r in (0.25, 0.5, 0.75) for g in range(2, 7)} <= set(ARMS)
    assert {f"spec{r}-auto" for r in (0.25, 0.5, 0.75)} <= set(ARMS)
    assert compare.SPECULATIVE_DEFAULT in DEFAULT_ARMS and BASELINE in DEFAULT_ARMS
    assert not [arm for arm in DEFAULT_ARMS if arm.startswith("spec") and arm != compare.SPECULATIVE_DEFAULT]
    assert len(compare.DEFAULT_SEEDS) >= 3


def test_every_arm_is_a_valid_config_whatever_the_base_sets_for_the_draft_length():
    """Each arm sets what defines it, so a base config or --set that turns on rollout.adaptive_draft (valid only in
    speculative mode) still gives every arm a valid config, and only the "-auto" arms draft adaptively."""
    from nested_reft_ds.config import load_config

    base = ["rollout.mode=speculative", "algorithm.correction=none", "rollout.adaptive_draft=true",
            "skip.target_ess=0.9"]
    for arm, overrides in ARMS.items():
        cfg = load_config(None, [*base, *overrides])
        assert cfg.rollout.adaptive_draft == arm.endswith("-auto"), arm
        assert (cfg.rollout.mode == "speculative") == arm.startswith("spec"), arm


@pytest.mark.parametrize("kwargs, message", [
    ({"arms": ("reft", "nope")}, "compare option '--arms' has invalid value 'nope'"),
    ({"arms": ()}, "'--arms'"),
    ({"seeds": (1, 1)}, "compare option '--seeds' has invalid value (1, 1)"),
    ({"parallel": 0}, "compare option '--parallel' has invalid value 0"),
])
def test_compare_config_errors_name_option_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CompareConfig(**kwargs)


def test_every_arm_starts_from_the_same_warmup(tmp_path):
    """Arms differ only in skip/algorithm (and train.steps vs the SFT-only job): one warm-up serves them all."""
    sft, arms = compare.plan_jobs(CONFIG, ["train.lr=1e-4"], CompareConfig(seeds=(7, 8), parallel=2), tmp_path)
    assert set(sft) == {7, 8} and len(arms) == 2 * len(DEFAULT_ARMS)
    for job in arms:
        warmup, cfg = sft[job.seed].cfg.to_dict(), job.cfg.to_dict()
        assert warmup["train"]["steps"] == 0 and cfg["train"]["steps"] > 0
        for section in ("model", "data", "rollout", "reward", "train"):
            a, b = dict(warmup[section]), dict(cfg[section])
            if section == "train":
                for key in ("steps", "output_dir"):
                    a.pop(key), b.pop(key)
            if section == "rollout":  # how RL samples (the warm-up samples nothing)
                for key in ("mode", "draft_length"):
                    a.pop(key), b.pop(key)
            assert a == b, (job.arm, section)
        assert job.cfg.train.seed == job.seed and job.cfg.train.lr == 1e-4 and job.cfg.train.cpu_threads == 1
        assert job.out_dir == tmp_path / "runs" / job.arm / f"seed{job.seed}"
    by_arm = {job.arm: job.cfg for job in arms if job.seed == 7}
    assert by_arm[BASELINE].skip.ratio == 0 and by_arm[BASELINE].algorithm.correction == "none"
    assert by_arm["skip0.5-seq_mis"].skip.ratio == 0.5 and by_arm["skip0.5-seq_mis"].algorithm.correction == "seq_mis"
    assert by_arm["adaptive-token_tis"].skip.schedule == "adaptive"
    speculative = by_arm[compare.SPECULATIVE_DEFAULT]
    assert speculative.rollout.mode == "speculative" and speculative.algorithm.correction == "none"
    assert speculative.rollout.generation.draft_length == speculative.rollout.draft_length >= 2
    assert by_arm[BASELINE].rollout.mode == "nested" and by_arm[BASELINE].rollout.generation.draft_length == 0
    assert [job.arm for job in arms if job.seed == 8][0] == DEFAULT_ARMS[1], "second seed runs the arms rotated"
    sft, arms = compare.plan_jobs(CONFIG, [], CompareConfig(quick=True), tmp_path)
    assert list(sft) == [compare.DEFAULT_SEEDS[0]] and arms[0].cfg.model.num_layers == 4


def test_rl_set_changes_the_arms_not_the_warmups(tmp_path):
    """--rl-set sweeps RL settings on existing warm-ups; an arm's own settings still define the arm."""
    grid = CompareConfig(seeds=(7,), arms=(BASELINE, "skip0.5-token_tis"))
    plain_sft, _ = compare.plan_jobs(CONFIG, [], grid, tmp_path)
    sft, arms = compare.plan_jobs(CONFIG, [], grid, tmp_path, ["train.lr=5e-5", "skip.ratio=0.3"])
    assert sft[7].cfg.to_dict() == plain_sft[7].cfg.to_dict()
    assert {job.arm: (job.cfg.train.lr, job.cfg.skip.ratio) for job in arms} == {
        BASELINE: (5e-5, 0), "skip0.5-token_tis": (5e-5, 0.5)}
    with pytest.raises(ConfigError, match="'train.lr' has invalid value"):
        compare.plan_jobs(CONFIG, [], grid, tmp_path, ["train.lr=-1"])


def test_base_config_is_deep_enough():
    from nested_reft_ds.config import load_config
    assert load_config(CONFIG).model.num_layers >= 12


def test_long_chain_recipe_is_rollout_heavy_by_construction():
    from nested_reft_ds.config import load_config
    from nested_reft_ds.data import problems_from_config

    cfg = load_config(LONG_CONFIG)
    assert cfg.model.num_layers >= 16 and cfg.rollout.max_new_tokens >= 256 and cfg.rollout.group_size == 8
    assert 0 < cfg.data.solution_error_rate < 1  # an imperfect demonstrator
    assert cfg.data.step_labels and cfg.data.restate_steps  # every number a line needs is a copy or local
    train, _ = problems_from_config(cfg.data, cfg.train.seed)
    lengths = sorted(len(p.solution) for p in train)  # characters = tokens of the embedded tokenizer
    assert lengths[0] >= 40 and lengths[len(lengths) // 2] < 130 and lengths[-1] > 200  # long-tailed
    assert lengths[-1] < cfg.rollout.max_new_tokens  # every worked solution fits the sampling budget


# ---------------------------------------------------------------------------------------------- end to end

def run_compare(*args, config: str = CONFIG):
    return subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "compare", "--config", config, *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def quick_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_quick")
    proc = run_compare("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quick_grid_writes_every_artefact(quick_grid):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image

    out, _ = quick_grid
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in records} == set(DEFAULT_ARMS) | {compare.SFT_ARM}
    assert {r["seed"] for r in records} == {compare.DEFAULT_SEEDS[0]}
    for arm in DEFAULT_ARMS:
        rl = [r for r in records if r["arm"] == arm and r["phase"] == "rl"]
        assert [r["step"] for r in rl] == [0, 1, 2], arm
        for key in ("reward_mean", "sample_accuracy", "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout_s",
                    "time_reward_s", "time_train_s", "time_step_s", "ess", "kl_behavior_k3", "frac_truncated",
                    "frac_masked"):
            assert key in rl[0], (arm, key)
        assert [r["step"] for r in records if r["arm"] == arm and r["phase"] == "eval"] == [0, 3], "eval twice"
        (job,) = [r for r in records if r["arm"] == arm and r["phase"] == "job"]
        assert 0 < job["cpu_s"] and 0 < job["wall_s"]
    assert not [r for r in records if r["arm"] != compare.SFT_ARM and r["phase"] == "sft"], "SFT ran once per seed"
    assert [r for r in records if r["arm"] == compare.SFT_ARM and r["phase"] == "sft"]

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == list(DEFAULT_ARMS)
    assert summary["arms"][BASELINE]["speedup"]["mean"] == pytest.approx(1.0)
    assert summary["arms"][BASELINE]["run_cpu_s"]["mean"] > 0
    assert summary["meta"]["rl_steps"] == 3 and "--quick" in summary["meta"]["command"]
    assert set(summary["paired"]) == set(DEFAULT_ARMS) - {BASELINE}  # every eval recorded per-problem results
    spec_rl = [r for r in records if r["arm"] == compare.SPECULATIVE_DEFAULT and r["phase"] == "rl"]
    assert all(0 <= r["spec_acceptance"] <= 1 and r["spec_tokens_per_verify"] >= 1 for r in spec_rl)
    table = (out / "summary.md").read_text()
    for arm in DEFAULT_ARMS:
        assert f"| {arm} |" in table
    for name in compare.PLOTS:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, name


def test_rerun_reuses_finished_runs(quick_grid):
    out, _ = quick_grid
    proc = run_compare("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"0 run(s) to do, {len(DEFAULT_ARMS)} arm run(s) reused" in proc.stdout


def test_a_run_saved_before_a_key_existed_is_reused_and_nothing_is_deleted(tmp_path):
    """A finished run whose saved config lacks a key added since (its default is how the run ran) is the same run;
    a directory that must be redone is moved aside, not deleted (a warm-up can be an hour of compute)."""
    from nested_reft_ds.config import load_config

    run = tmp_path / "runs" / BASELINE / "seed1"
    job = compare.Job(BASELINE, 1, load_config(CONFIG, [f"train.output_dir={run}"]))
    run.mkdir(parents=True)
    (run / "checkpoint.bin").write_text("an hour of compute")
    record = {"config": job.cfg.to_dict(), "deepspeed": None}
    (run / compare.DONE_FILE).write_text(json.dumps(record))
    assert compare.is_done(job, None)
    del record["config"]["rollout"]["mode"], record["config"]["rollout"]["draft_length"]  # as written before them
    (run / compare.DONE_FILE).write_text(json.dumps(record))
    assert compare.is_done(job, None)
    record["config"]["rollout"]["no_such_key"] = 1  # a key since removed: another run
    (run / compare.DONE_FILE).write_text(json.dumps(record))
    assert not compare.is_done(job, None)
    assert not compare.is_done(compare.Job(BASELINE, 1, load_config(CONFIG, [f"train.output_dir={run}",
                                                                            "rollout.draft_length=5"])), None)

    compare.prepare_dir(job, None)
    aside = [d for d in run.parent.iterdir() if d.name.startswith("seed1.previous-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint.bin").read_text() == "an hour of compute"
    assert run.is_dir() and not any(run.iterdir())


def test_killed_compare_takes_its_workers_with_it(tmp_path):
    """SIGKILL to `compare` (no handler of its own can run) still ends its workers: none goes on training into a
    directory the next compare clears."""
    psutil = pytest.importorskip("psutil")
    proc = subprocess.Popen([sys.executable, "-m", "nested_reft_ds.cli", "compare", "--config", CONFIG, "--quick",
                             "--out", str(tmp_path), "--parallel", "2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(log.stat().st_size for log in tmp_path.rglob("train.log")):  # a worker is training
            assert proc.poll() is None and time.monotonic() < deadline, "compare ended before a run started"
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"


def test_bad_option_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert compare.main(["--config", CONFIG, "--out", str(tmp_path), "--arms", "reft", "typo"]) == 2
    assert "'--arms' has invalid value 'typo'" in capsys.readouterr().err
    assert compare.main(["--config", CONFIG, "--out", str(tmp_path), "--set", "rollout.group_size=1"]) == 2
    assert "'rollout.group_size' has invalid value 1" in capsys.readouterr().err
    assert compare.main(["--out", str(tmp_path), "--report-only"]) == 2
    assert "runs.jsonl' does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing half-started"


def test_long_chain_recipe_quick_grid_runs_every_arm(tmp_path):
    proc = run_compare("--quick", "--out", str(tmp_path), config=LONG_CONFIG)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in records} == set(DEFAULT_ARMS) | {compare.SFT_ARM}
    assert list(json.loads((tmp_path / "summary.json").read_text())["arms"]) == list(DEFAULT_ARMS)
    # Quick warm-ups train the full model before train.sft_layer_drop_from=2, then LayerDrop on odd steps (half
    # of the quick model's 4 layers).
    warmups = [r for r in records if r["arm"] == compare.SFT_ARM and r["phase"] == "sft"]
    assert warmups and all([r["sft_skipped"] for r in warmups if r["seed"] == seed] == [0, 0, 0, 2]
                           for seed in {r["seed"] for r in warmups})


def test_warmup_only_then_arms_elsewhere_reuse_the_warmup(tmp_path):
    """--warmup-only makes the seed's warm-up and nothing else; a grid moved to another path reuses it."""
    made = tmp_path / "made_here"
    proc = run_compare("--quick", "--arms", BASELINE, "--out", str(made), "--warmup-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 run(s) to do" in proc.stdout
    seed = compare.DEFAULT_SEEDS[0]
    assert (made / "sft" / f"seed{seed}" / compare.DONE_FILE).is_file()
    assert not (made / "runs").exists() and not (made / "runs.jsonl").exists(), "no arm, no report"

    moved = tmp_path / "copied_there"
    made.rename(moved)
    proc = run_compare("--quick", "--arms", BASELINE, "--out", str(moved))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 run(s) to do, 0 arm run(s) reused" in proc.stdout, "the warm-up is reused, only the arm runs"
    records = [json.loads(line) for line in (moved / "runs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["arm"] == BASELINE and r["phase"] == "rl"] == [0, 1, 2]
    assert not [r for r in records if r["arm"] == BASELINE and r["phase"] == "sft"], "the arm resumed after SFT"

    proc = run_compare("--quick", "--arms", BASELINE, "--out", str(moved), "--rl-set", "train.lr=1e-5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 run(s) to do, 0 arm run(s) reused" in proc.stdout, "--rl-set reruns the arm on the same warm-up"
    def recorded_lr(run_dir):
        return json.loads((run_dir / compare.DONE_FILE).read_text())["config"]["train"]["lr"]
    assert recorded_lr(moved / "runs" / BASELINE / f"seed{seed}") == 1e-5
    assert recorded_lr(moved / "sft" / f"seed{seed}") != 1e-5
    assert "--rl-set train.lr=1e-5" in json.loads((moved / "summary.json").read_text())["meta"]["command"]
