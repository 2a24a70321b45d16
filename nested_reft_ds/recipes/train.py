"""Nested-ReFT training recipe: `python -m nested_reft_ds.train` / `nested-reft train` / the deepspeed launcher.

The run: an optional SFT warm-up (`sft_step`), then RL steps (`recipes.rl_step`: plan skip -> rollout with the
nested behaviour model -> reward -> group advantages -> corrected clipped loss -> backward/step -> metrics), with
checkpoints, held-out evaluations and resumption (`run`).

Where this departs from the Nested-ReFT paper, and why:
- The off-policy correction is configurable (`algorithm.correction`, default per-token truncated IS,
  `token_tis`) instead of one fixed estimator: per-token forms keep variance bounded when sequence ratio
  products saturate (a per-token ratio of 1.1 is ~14,000 over 100 tokens).
- pi_prox (the full target at sampling time) is read off the training forward itself, detached (one optimisation
  pass per rollout batch; see `recipes.rl_step`), and every log-prob is taken at the rollout temperature.
- The skip plan is a function of (seed, step) and of statistics already all-reduced (adaptive schedule, learned
  layer choice), not broadcast from rank 0: no communication, and
  resume reproduces it; agreement is still verified by a collective check each step.
- The embedded default starts from a randomly initialised tiny model, so an SFT warm-up (`train.sft_steps`)
  precedes RL to give it non-zero reward; a pretrained `model.path` sets sft_steps to 0. The warm-up uses
  LayerDrop (`train.sft_layer_drop`): a model trained from scratch without it is no usable behaviour policy
  once layers are skipped, where pretrained LLMs tolerate skipping middle layers. Its lr decays to the RL lr.
- The KL reference (`algorithm.kl_coef > 0`) is the policy as RL starts: after the SFT warm-up, or as loaded
  when there is none, rather than the pretrained base model (with a warm-up that is the model RL refines).
  It sees the full model (no skipping) and is scored at the rollout temperature, like pi_theta. It is frozen;
  every RL checkpoint carries a copy of it, so a resumed run penalises against the very same reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import engine as ds
from .. import run_dir
from ..checks import check_model_inputs, check_output_dir, check_solutions
from ..config import ConfigError, ExperimentConfig, load_config
from ..data import MathProblem, problems_from_config
from ..data.templates import format_prompt
from ..faults import check_fault_ranks, maybe_fail
from ..fingerprint import base_model_fingerprint, check_base_model, model_fingerprint, run_fingerprint, write_fingerprint
from ..model import build_tiny_model, check_model_dir, select_attn_implementation
from ..nested import SkipPlan, SkipScheduler, nested_view, sample_skip_plan
from ..rollout import Rollout, completion_logprobs, encode_prompts
from ..run_log import RunLog
from ..speculative import DraftLengths
from ..eval_metrics import EvalSums
from .batching import batch_indices, local_share, micro_batches
from .evaluate import EvalSettings, evaluate_problems
from .rl_step import StepContext, rl_step, unpartitioned

log = logging.getLogger("nested_reft_ds")
HELDOUT_BATCH = 64  # sequences per generate call of the held-out evaluation


# ------------------------------------------------------------------------------------------ data plumbing

def teacher_forced(tokenizer, problems: list[MathProblem], template: str, device, *,
                   question_loss: bool = False) -> tuple[Rollout, torch.Tensor]:
    """Worked solutions (+ EOS) laid out like a rollout for the SFT warm-up, and the mask [B, T] of the completion
    positions that hold the solution. The loss covers the completion: with `question_loss` that starts after the
    prompt's first token, so the question is trained on as well; without, it is the solution alone."""
    prompts = [format_prompt(p.question, tokenizer, template) for p in problems]
    targets = [tokenizer(" " + p.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for p in problems]
    if question_loss:
        prompt_rows = tokenizer(prompts, add_special_tokens=False).input_ids
        prompt_ids = torch.tensor([row[:1] for row in prompt_rows], dtype=torch.long, device=device)
        prompt_mask = torch.ones_like(prompt_ids)
        questions = [row[1:] for row in prompt_rows]
    else:
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
        questions = [[] for _ in problems]
    width = max(len(q) + len(t) for q, t in zip(questions, targets))
    completions = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(targets), width), dtype=torch.long)
    solution_mask = torch.zeros((len(targets), width), dtype=torch.long)
    for row, (question, target) in enumerate(zip(questions, targets)):
        completions[row, :len(question) + len(target)] = torch.tensor(question + target)
        completion_mask[row, :len(question) + len(target)] = 1
        solution_mask[row, len(question):len(question) + len(target)] = 1
    rollout = Rollout(sequences=torch.cat([prompt_ids, completions.to(device)], 1), prompt_mask=prompt_mask,
                      completion_mask=completion_mask.to(device),
                      behavior_logprobs=torch.zeros(completions.shape, device=device))
    return rollout, solution_mask.to(device)


def sft_step(engine, tokenizer, problems: list[MathProblem], cfg: ExperimentConfig, step: int, rank: int,
             world: int) -> dict[str, float]:
    """One supervised step on worked solutions (the warm-up): token-mean cross entropy over all ranks.

    `sft_loss` is the solution's token-mean loss whether or not the question is trained on
    (`train.sft_question_loss`, which adds `sft_question_loss`), so warm-ups compare on one measure."""
    # Linear decay from sft_lr to the RL lr, not to 0: RL continues at the lr the warm-up ends with, and a warm-up
    # annealed to 0 settles where the landscape is too sharp for RL's steps (docs/results/default_run.md).
    lr = cfg.train.sft_lr + (cfg.train.lr - cfg.train.sft_lr) * step / cfg.train.sft_steps
    ds.set_learning_rate(engine, lr)
    micro = engine.train_micro_batch_size_per_gpu()
    local_rows = micro * engine.gradient_accumulation_steps()
    chosen = batch_indices(len(problems), local_rows * world, step, cfg.train.seed + 1)
    batch, solution_mask = teacher_forced(tokenizer, [problems[i] for i in local_share(chosen, rank, world)],
                                          cfg.data.prompt_template, ds.device(),
                                          question_loss=cfg.train.sft_question_loss)
    (num_global_tokens,) = ds.all_reduce_sum([batch.num_completion_tokens])
    # Odd steps from train.sft_layer_drop_from on train a random nested view (LayerDrop), a pure function of
    # (seed, step) like RL skip plans.
    num_layers = engine.module.config.num_hidden_layers
    plan = (sample_skip_plan(num_layers, cfg.train.sft_layer_drop, step, cfg.train.seed + 2)
            if step % 2 and step >= cfg.train.sft_layer_drop_from else SkipPlan(num_layers))
    engine.train()
    # This rank's summed negative log-likelihood: all loss tokens, and the solution's (read once, after the loop).
    total_nll = solution_nll = torch.zeros((), device=solution_mask.device)
    for rows in micro_batches(batch.prompt_mask.sum(dim=1), batch.completion_mask.sum(dim=1), micro, 1,
                              cfg.train.bucket_by_length):
        micro_batch = batch.select(rows)
        with nested_view(engine.module, plan):
            logprobs = completion_logprobs(engine, micro_batch, 1.0, chunked_head=unpartitioned(engine))
        nll = -(logprobs * micro_batch.completion_mask)
        engine.backward(nll.sum() / num_global_tokens * ds.loss_scale_for_engine(engine))
        ds.optimizer_step(engine)  # skipped layers take a zero-gradient step at every ZeRO stage
        total_nll = total_nll + nll.detach().sum()
        solution_nll = solution_nll + (nll.detach() * solution_mask[rows][:, :nll.shape[1]]).sum()
    maybe_fail("sft", step, rank)
    solution_tokens = int(solution_mask.sum())
    solution_nll, total_nll, solution_tokens, total_tokens = ds.all_reduce_sum(
        [float(solution_nll), float(total_nll), solution_tokens, batch.num_completion_tokens])
    metrics = {"sft_loss": solution_nll / solution_tokens, "lr": lr, "sft_skipped": len(plan.skipped)}
    if cfg.train.sft_question_loss:
        metrics["sft_question_loss"] = (total_nll - solution_nll) / max(total_tokens - solution_tokens, 1.0)
    return metrics


def heldout_evaluation(engine, tokenizer, problems: list[MathProblem], cfg: ExperimentConfig, rank: int,
                       world: int) -> dict[str, float]:
    """Held-out greedy evaluation of the full target (no skipping), through the code `nested-reft eval` runs
    (`evaluate_problems`: the same sharding over ranks, chunks and scoring), so a run's logged accuracy and
    `eval --greedy` on its exported model agree. Collective: every rank runs as many chunks, sums all-reduced.

    Returns heldout_accuracy (greedy pass@1), heldout_completion_length, heldout_truncated, heldout_no_answer and
    heldout_correct (a "0"/"1" string, one character per problem in held-out order)."""
    settings = EvalSettings(samples=1, batch_size=HELDOUT_BATCH, prompt_template=cfg.data.prompt_template,
                            seed=cfg.train.seed,
                            generation=dataclasses.replace(cfg.rollout.generation, greedy=True, draft_length=0))
    engine.eval()

    def decoding(plan: SkipPlan):
        return ds.skip_aware_gather(engine, plan, cfg.rollout.gather,
                                    memory_fraction=cfg.rollout.gather_memory_fraction)

    local, records = evaluate_problems(engine.module, tokenizer, problems, settings,
                                       reward_timeout=cfg.reward.timeout, rel_tol=cfg.reward.rel_tol,
                                       last_number=cfg.reward.last_number, rank=rank, world=world, decoding=decoding)
    metrics = EvalSums.from_list(1, ds.all_reduce_sum(local.as_list())).metrics()
    correct = [0.0] * len(problems)
    for record in records:
        correct[record["index"]] = float(record["num_correct"])
    correct = ds.all_reduce_sum(correct)
    return {"heldout_accuracy": metrics["pass@1"], "heldout_completion_length": metrics["mean_completion_tokens"],
            "heldout_truncated": metrics["truncated_rate"], "heldout_no_answer": metrics["no_answer_rate"],
            # Which problems were solved, in held-out order: paired comparisons between runs (`compare`).
            "heldout_correct": "".join("1" if c > 0 else "0" for c in correct)}


# ----------------------------------------------------------------------------------------------- driver

@dataclass
class Progress:
    """What a checkpoint adds to DeepSpeed's own state: where in the run we are."""
    sft_step: int = 0
    rl_step: int = 0

    def tag(self) -> str:
        return f"rl_step{self.rl_step}" if self.rl_step else f"sft_step{self.sft_step}"


def prepare_model_dir(cfg: ExperimentConfig, out_dir: Path, rank: int) -> Path:
    """model.path, or the embedded tiny model built (once, by rank 0) into <output_dir>/base_model."""
    if cfg.model.path is not None:
        return check_model_dir(cfg.model.path)  # config.json and a tokenizer, or one line naming model.path
    path = out_dir / "base_model"
    if rank == 0 and not (path / "config.json").is_file():
        build_tiny_model(cfg.model, path, cfg.train.seed)
        write_fingerprint(path, base_model_fingerprint(cfg.model, cfg.train.seed))
    ds.barrier()
    check_base_model(path, cfg.model, cfg.train.seed)  # a stale base_model: ConfigError naming keys and values
    return path


def start_reference(engine, cfg: ExperimentConfig, ds_config: dict, model_dir: Path, progress: Progress,
                    resumed_from: Path | None):
    """The frozen KL reference for the RL phase (None when algorithm.kl_coef is 0). Collective.

    At RL step 0 it is a copy of the policy now (after the SFT warm-up, or as loaded); past step 0 the policy
    has moved on, so the copy saved in the checkpoint being resumed is restored instead."""
    if cfg.algorithm.kl_coef == 0 or progress.rl_step >= cfg.train.steps:
        return None
    if progress.rl_step == 0:
        return ds.build_reference(model_dir, ds_config, cfg.model.attn_implementation, policy=engine)
    if resumed_from is None or not ds.has_saved_reference(resumed_from):
        raise ConfigError(f"config key 'algorithm.kl_coef' has invalid value {cfg.algorithm.kl_coef!r} for resuming "
                          f"from {str(resumed_from)!r}: that checkpoint holds no KL reference (it was written with "
                          "algorithm.kl_coef=0), and the reference (the policy at RL step 0) cannot be rebuilt "
                          "from a later step; resume with algorithm.kl_coef=0 or start RL from an SFT checkpoint")
    return ds.build_reference(model_dir, ds_config, cfg.model.attn_implementation, saved=resumed_from)


def warn(text: str) -> None:
    """A one-line warning on stderr (the caller decides which rank prints)."""
    print(f"nested-reft: warning: {text}", file=sys.stderr, flush=True)


@dataclass
class ResumePlan:
    """What a run continues from, decided by rank 0 once it owns the run directory (`plan_resume`)."""
    save_dir: str | None = None  # the checkpoint directory to load from; None: start afresh
    tags: list[str] = field(default_factory=list)  # its tags to try, in order: the first that loads is resumed
    pinned: bool = False  # --resume TAG: that tag or nothing, made current once loaded
    warnings: list[str] = field(default_factory=list)  # one line each, printed by rank 0


def plan_resume(resume: str, out_dir: Path, overwrite: bool) -> ResumePlan:
    """Read `--resume` against what `out_dir` holds. Rank 0, holding the run directory's lock.

    auto (or DIR naming <output_dir>/checkpoints): the committed tags, newest first (`resume_candidates`; a missing or
    empty `latest` is warned about and the newest committed tag is used). TAG (a tag name in <output_dir>/
    checkpoints): that committed tag. none, or DIR elsewhere: a fresh start in `out_dir`, refused while it holds an
    earlier run (`run_dir.earlier_run`) unless `overwrite`, which moves that run aside first."""
    ckpt_dir = out_dir / "checkpoints"
    as_tag = resume not in ("auto", "none") and "/" not in resume and (
        ds.tag_order(resume) is not None or (ckpt_dir / resume).is_dir())
    fresh = resume == "none" or (resume != "auto" and not as_tag and Path(resume).resolve() != ckpt_dir.resolve())
    if overwrite and not fresh:
        raise ConfigError(f"--overwrite moves an earlier run aside to start afresh: it goes with --resume none or "
                          f"--resume DIR (a checkpoint directory elsewhere), not --resume {resume}")
    if as_tag:
        committed = ds.committed_tags(ckpt_dir)
        unrecorded = not committed and ds.latest_tag(ckpt_dir) is None and (ckpt_dir / resume).is_dir()
        if resume not in committed and not unrecorded:
            raise ConfigError(f"--resume {resume}: no committed checkpoint {resume!r} in {str(ckpt_dir)!r} "
                              f"(committed: {', '.join(committed) or 'none'})")
        newer = committed[committed.index(resume) + 1:] if resume in committed else []
        notes = [f"resuming from {resume}, older than {', '.join(newer)}: metrics.jsonl drops the records after it, "
                 "and the newer checkpoints stay until this run writes over them or train.keep_checkpoints prunes "
                 "them"] if newer else []
        return ResumePlan(str(ckpt_dir), [resume], pinned=True, warnings=notes)
    if not fresh:
        tags, note = ds.resume_candidates(ckpt_dir)
        if not tags and resume != "auto":
            raise ConfigError(f"--resume {resume}: no committed checkpoint there")
        notes = [f"{note}; resuming from the newest committed checkpoint, {tags[0]}"] if note and tags else []
        return ResumePlan(str(ckpt_dir), tags, warnings=notes)
    notes = []
    earlier = run_dir.earlier_run(out_dir)
    if earlier and not overwrite:
        raise ConfigError(f"--resume {resume}: train.output_dir {str(out_dir)!r} holds an earlier run "
                          f"({'; '.join(earlier)}); continue it with --resume auto, or pass --overwrite to move it "
                          f"aside into {str(out_dir / run_dir.PREVIOUS_DIR)!r}")
    if earlier:
        notes.append(f"moved the earlier run in {str(out_dir)!r} aside to {str(run_dir.move_aside(out_dir))!r}")
    if resume == "none":
        return ResumePlan(warnings=notes)
    tags, note = ds.resume_candidates(Path(resume))
    if not tags:
        raise ConfigError(f"--resume {resume}: no committed checkpoint there")
    return ResumePlan(resume, tags, warnings=notes + ([f"{note}; resuming from the newest committed checkpoint, "
                                                       f"{tags[0]}"] if note else []))


def claim_output_dir(out_dir: Path, resume: str, overwrite: bool, rank: int
                     ) -> tuple[run_dir.RunDirLock | None, ResumePlan]:
    """Rank 0 takes the run directory (`run_dir.acquire`: a second job on it stops here with one line naming the
    holder), decides what to resume (`plan_resume`) and removes what dead processes left half-written (temp files,
    uncommitted tags); every rank then gets the plan, or raises the same ConfigError. Collective: one broadcast.
    Ranks other than 0 never touch the lock, so a job spanning nodes takes it once."""
    lock, verdict = None, None
    if rank == 0:
        try:
            lock = run_dir.acquire(out_dir)
            verdict = plan_resume(resume, out_dir, overwrite)
            if lock.previous:
                verdict.warnings.insert(0, f"took over {str(lock.path)!r} from a run that has ended without "
                                           f"releasing it ({run_dir.describe_holder(lock.previous)})")
            run_dir.remove_temp_files(out_dir)
            ds.remove_uncommitted(out_dir / "checkpoints")
        except ConfigError as error:
            verdict = str(error)
    verdict = ds.broadcast_object(verdict)
    if isinstance(verdict, str):
        if lock is not None:
            lock.release()
        raise ConfigError(verdict)
    if rank == 0:
        for text in verdict.warnings:
            warn(text)
    return lock, verdict


def stop_if_diverged(engine, phase: str, step: int, metrics: dict[str, float], keys: tuple[str, ...]) -> None:
    """A ConfigError (one line, exit 2) when a loss in `metrics` or the step's gradient norm is not finite: training
    has diverged at `phase` step `step`, deterministically (a rerun with the same settings diverges again, hence a
    user error and not a crash), and nothing from this step on is logged or committed. Every rank checks the same
    all-reduced numbers and stops alike."""
    values = {key: metrics[key] for key in keys if metrics.get(key) is not None}
    if "grad_norm" not in values and ds.last_grad_norm(engine) is not None:
        values["grad_norm"] = ds.last_grad_norm(engine)
    bad = [f"{key} {value}" for key, value in values.items() if not math.isfinite(value)]
    if bad:
        lr = "train.sft_lr" if phase == "sft" else "train.lr"
        raise ConfigError(f"non-finite {', '.join(bad)} at {phase} step {step}: training diverged; nothing from "
                          f"this step on is logged or committed (lower {lr} or set train.grad_clip > 0; a rerun "
                          "resumes from the last committed checkpoint)")


def run(cfg: ExperimentConfig, ds_config_path: str | None, resume: str,
        overwrite: bool = False) -> dict[str, float | None]:
    """Train per `cfg`; returns summary numbers (reward and accuracy before/after; None where nothing was held
    out). Collective.

    `resume`: auto, none, a checkpoint directory or a tag name (`plan_resume`); `overwrite`: move an earlier run in
    train.output_dir aside instead of refusing to start afresh there. The job owns train.output_dir from before
    anything in it is read until it returns (`claim_output_dir`)."""
    check_output_dir(cfg.train.output_dir)
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(ds.cpu_threads_per_rank(cfg.train.cpu_threads))
    rank, world = ds.init_distributed()
    check_fault_ranks(world)
    ds.start_watchdog()
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    lock, plan = claim_output_dir(out_dir, resume, overwrite, rank)
    try:
        return train_in_output_dir(cfg, ds_config_path, plan, out_dir, rank, world)
    except OSError as error:
        if error.errno in ds.NO_SPACE:
            raise ds.no_space_error(error, out_dir) from error
        raise
    finally:
        if lock is not None:
            lock.release()


def train_in_output_dir(cfg: ExperimentConfig, ds_config_path: str | None, plan: ResumePlan, out_dir: Path,
                        rank: int, world: int) -> dict[str, float]:
    """The body of `run`, once this job owns `out_dir`. Collective."""
    ds_config = ds.fill_ds_config(ds.load_ds_config(ds_config_path, cfg), cfg, world)
    train_problems, eval_problems = problems_from_config(cfg.data, cfg.train.seed)
    check_solutions(cfg, train_problems)
    model_dir = prepare_model_dir(cfg, out_dir, rank)
    model, tokenizer = ds.load_model_for_engine(model_dir, ds_config, cfg.model.attn_implementation)
    warnings = check_model_inputs(cfg, model.config, tokenizer, train_problems, eval_problems)
    engine = ds.build_engine(model, ds_config)
    skip = SkipScheduler(cfg.skip, model.config.num_hidden_layers, cfg.train.seed)
    draft = DraftLengths(cfg.rollout.draft_length, cfg.rollout.adaptive_draft, cfg.rollout.max_draft_length)
    ckpt_dir = out_dir / "checkpoints"
    # What a checkpoint pins (nested_reft_ds.fingerprint): checked before a resume loads anything, recorded by
    # every save (an SFT checkpoint pins less than an RL one: RL may start from it with another rollout layout).
    model_fp = model_fingerprint(model.config, tokenizer)
    fingerprint = {phase: run_fingerprint(cfg, model_fp, world, ds_config=ds_config, problems=train_problems,
                                          phase=phase) for phase in (None, "sft", "rl")}

    progress = Progress()
    resumed_from = None  # the checkpoint directory <dir>/<tag> this run continues from
    if plan.tags:
        state, tag = ds.load_first_loadable(engine, Path(plan.save_dir), plan.tags, fingerprint=fingerprint[None],
                                            warn=warn if rank == 0 else lambda text: None)
        progress = Progress(**state["progress"])
        skip.load_state_dict(state["skip"])
        if "draft" in state:  # checkpoints written before rollout.adaptive_draft existed have none
            draft.load_state_dict(state["draft"])
        resumed_from = Path(plan.save_dir) / tag
        if plan.pinned and rank == 0 and ds.latest_tag(plan.save_dir) != tag:
            ds.make_current(plan.save_dir, tag)  # a crash before the next commit resumes here again
    # After the resume check, so that a refused resume never touches metrics.jsonl; records past the resume
    # point (written before a crash) are dropped, so each step is in the files once.
    run_log = RunLog(out_dir, rank == 0, tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
                     resume_at=(progress.sft_step, progress.rl_step),
                     echo_prefix=f"[rank {rank}] " if cfg.logging.all_ranks and rank != 0 else None)
    run_log.message(f"world {world} | ZeRO-{engine.zero_optimization_stage()} | attention "
                    f"{select_attn_implementation(cfg.model.attn_implementation)} | "
                    f"{model.config.num_hidden_layers} layers | resume at sft {progress.sft_step}, rl {progress.rl_step}")
    for warning in warnings:
        run_log.message(f"warning: {warning}")

    reference = None  # the frozen KL reference, from the start of RL on

    def checkpoint() -> None:
        def finish_tag(tag_dir: Path) -> None:  # every rank, once its shard is on disk, before the commit
            if reference is not None:
                ds.save_reference(reference, tag_dir)
            maybe_fail("checkpoint", progress.rl_step or progress.sft_step, rank)
        if not ds.parameters_finite(engine):
            phase, step = ("rl", progress.rl_step - 1) if progress.rl_step else ("sft", progress.sft_step - 1)
            raise ConfigError(f"non-finite weights after {phase} step {step}: training diverged; checkpoint "
                              f"{progress.tag()} is not written (lower train.{'lr' if phase == 'rl' else 'sft_lr'} or "
                              "set train.grad_clip > 0; a rerun resumes from the last committed checkpoint)")
        state = {"progress": vars(progress), "skip": skip.state_dict(), "draft": draft.state_dict(),
                 "config": cfg.to_dict()}
        ds.save_checkpoint(engine, ckpt_dir, progress.tag(), state, keep=cfg.train.keep_checkpoints,
                           fingerprint=fingerprint["rl" if progress.rl_step else "sft"], write_extra=finish_tag)

    def due(step: int, last: int) -> bool:  # a checkpoint every train.save_every steps and at the end of a phase
        return (cfg.train.save_every and step % cfg.train.save_every == 0) or step == last

    run_log.start_phase("warm-up", cfg.train.sft_steps, progress.sft_step)
    while progress.sft_step < cfg.train.sft_steps:
        metrics = sft_step(engine, tokenizer, train_problems, cfg, progress.sft_step, rank, world)
        stop_if_diverged(engine, "sft", progress.sft_step, metrics, ("sft_loss", "sft_question_loss"))
        if progress.sft_step % cfg.logging.log_every == 0:
            run_log.log(progress.sft_step, metrics, phase="sft")
        progress.sft_step += 1
        run_log.step_done()
        if due(progress.sft_step, cfg.train.sft_steps):
            checkpoint()

    def evaluate() -> float | None:
        if not eval_problems:  # n/a: an accuracy of 0 would read as a model that solves nothing
            return None
        metrics = heldout_evaluation(engine, tokenizer, eval_problems, cfg, rank, world)
        run_log.log(progress.rl_step, metrics, phase="eval")
        return metrics["heldout_accuracy"]

    reference = start_reference(engine, cfg, ds_config, model_dir, progress, resumed_from)
    summary = {"heldout_accuracy_before": evaluate()}
    first_rewards, last_rewards = [], []
    accuracy = summary["heldout_accuracy_before"]  # held-out accuracy at the current step, if measured
    run_log.start_phase("rl", cfg.train.steps, progress.rl_step)
    while progress.rl_step < cfg.train.steps:
        step = progress.rl_step
        ds.set_learning_rate(engine, cfg.train.lr * min(1.0, (step + 1) / max(cfg.train.lr_warmup_steps, 1)))
        metrics = rl_step(StepContext(engine, tokenizer, cfg, train_problems, skip, rank, world, reference, draft),
                          step)
        stop_if_diverged(engine, "rl", step, metrics, ("loss", "grad_norm"))
        (first_rewards if step < cfg.train.steps / 2 else last_rewards).append(metrics["reward_mean"])
        if step % cfg.logging.log_every == 0:
            run_log.log(step, metrics)
        progress.rl_step += 1
        run_log.step_done()
        accuracy = None
        if cfg.logging.eval_every and progress.rl_step % cfg.logging.eval_every == 0:
            accuracy = evaluate()
        if due(progress.rl_step, cfg.train.steps):
            checkpoint()
    if progress.rl_step > 0:
        summary["heldout_accuracy_after"] = evaluate() if accuracy is None else accuracy
    if first_rewards and last_rewards:
        summary.update(reward_first_half=sum(first_rewards) / len(first_rewards),
                       reward_second_half=sum(last_rewards) / len(last_rewards))
    run_log.message("summary: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in summary.items()))
    run_log.close()
    ds.stop_watchdog()
    ds.barrier()  # no rank tears down while another still communicates (nor while its watchdog still polls)
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="nested-reft train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="experiment YAML (default: the embedded tiny arithmetic recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set rollout.group_size=8 (repeatable)")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (\"auto\" values are filled from the config)")
    parser.add_argument("--resume", default="auto", metavar="auto|none|TAG|DIR",
                        help="auto: continue from the newest committed checkpoint in <output_dir>/checkpoints that "
                             "loads (default; a damaged one is passed over with a warning); none: start fresh "
                             "(refused where output_dir holds a run, unless --overwrite); TAG: a committed tag of "
                             "<output_dir>/checkpoints, e.g. rl_step20; DIR: another run's checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume none or DIR: move an earlier run in output_dir aside into "
                             "<output_dir>/previous/<timestamp>/ instead of refusing")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def train_main(args: argparse.Namespace) -> int:
    """Fail-stop (`engine.failstop`): a `ConfigError` on any rank is one line and exit 2; any other exception
    prints its traceback once, rank-tagged, and ends every rank of the job with exit 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return ds.fail_stop(lambda: run(load_config(args.config, args.overrides), args.deepspeed, args.resume,
                                        args.overwrite))
    finally:
        ds.shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    return train_main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
