"""Checkpoints: DeepSpeed engine state + our client state, committed atomically; export to a HF model.

A checkpoint is `<dir>/<tag>/` written by `engine.save_checkpoint` on every rank, then made current by
rank 0 replacing `<dir>/latest` atomically (write to a temp file, fsync, os.replace). A crash mid-save
leaves `latest` pointing at the previous complete checkpoint, so nothing is lost and `--resume` is safe.

`latest` is the one commit point. `<dir>/committed_tags` lists the committed tags in commit order (rewritten
atomically after each commit; a crash between the two is healed on the next read, which appends `latest`).
Retention (`keep`) keeps the last N of that list and always the tag `latest` names; a tag directory in neither
(a save that crashed before its commit) is removed too, so it can never be chosen nor linger. A directory with
`latest` but no `committed_tags` is listed in tag order (`sft_step{n}` before `rl_step{n}`, by step) up to `latest`.

A save that fails (a full disk, a rank's error) leaves nothing behind: every rank removes the uncommitted tag
directory and our temp files before the error propagates, and a full disk is named as such (`ConfigError`: one line,
exit 2), where torch's own message is only a stream position.

Resuming (`resume_candidates`, `load_first_loadable`) tries the tag `latest` names, then the other committed tags,
newest commit first: a missing or empty `latest`, or a tag with a truncated or empty file, is passed over with a
one-line warning naming it, so a damaged checkpoint costs the steps since the previous one and nothing more.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .distributed import all_gather_object, barrier
from .internals import has_zero_optimizer_shards, load_model_states, model_states_files
from ..config import ConfigError
from ..fingerprint import FILENAME as FINGERPRINT_FILE, check_compatible, read_fingerprint, write_fingerprint
from ..run_dir import atomic_write

COMMITTED = "committed_tags"
TAG_PATTERN = re.compile(r"^(sft|rl)_step(\d+)$")  # the tags the training loop writes (train.Progress.tag)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# torch.save's C++ writer reports a short write (a full disk, among others) with these words and no errno.
SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
# A DeepSpeed or reference file that one rank writes and reads: `zero_pp_rank_<r>_...`, `zero3_rank<rrr>_of...`.
RANK_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_|zero3_rank(\d+)_of)")


def _can_write(directory: Path, size: int) -> bool:
    """Whether `size` more bytes fit in `directory`'s filesystem: written, synced and removed again (a short write
    of torch.save carries no errno, and free-space figures lie on network and quota-limited filesystems)."""
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    probe = directory / f".space-probe.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(size))
            handle.flush()
            os.fsync(handle.fileno())
        return True
    except OSError as error:
        return error.errno not in NO_SPACE
    finally:
        probe.unlink(missing_ok=True)


def disk_full(error: BaseException, directory: Path) -> bool:
    """Whether `error`, raised while writing into `directory`, comes from a full disk (or exhausted quota)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    return (isinstance(error, RuntimeError) and any(words in str(error) for words in SHORT_WRITE)
            and not _can_write(directory, 1 << 20))


def no_space_error(error: BaseException, path: Path) -> ConfigError:
    """The one-line error for a write into `path` that found the disk full."""
    named = getattr(error, "filename", None) or path
    return ConfigError(f"no space left on device writing {named}")


def tag_order(tag: str) -> tuple[int, int] | None:
    """Position of a training-loop tag in a run (every SFT step before every RL step); None for other names."""
    match = TAG_PATTERN.match(tag)
    return (0 if match.group(1) == "sft" else 1, int(match.group(2))) if match else None


def committed_tags(save_dir: str | Path) -> list[str]:
    """Committed tags whose directories exist, oldest commit first; the one `latest` names is always last-or-in."""
    save_dir = Path(save_dir)
    latest = latest_tag(save_dir)
    listing = save_dir / COMMITTED
    if listing.is_file():
        tags = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    else:  # no list: every loop tag up to `latest`, in tag order
        bound = tag_order(latest) if latest else None
        tags = sorted((d.name for d in save_dir.iterdir() if d.is_dir() and tag_order(d.name) and bound
                       and tag_order(d.name) <= bound), key=tag_order) if save_dir.is_dir() else []
    if latest is not None and latest not in tags:  # a crash between the commit and the list's rewrite
        tags.append(latest)
    return [tag for tag in dict.fromkeys(tags) if (save_dir / tag).is_dir()]


def _commit(save_dir: Path, tag: str) -> None:
    """Make `tag` current (`latest`, the commit point), then record it last in `committed_tags`."""
    tags = [t for t in committed_tags(save_dir) if t != tag]
    atomic_write(save_dir / "latest", tag)
    atomic_write(save_dir / COMMITTED, "".join(f"{t}\n" for t in tags + [tag]))


def clear_tag(save_dir: str | Path, tag: str) -> None:
    """Before (re)writing `tag`: remove an earlier copy of it, uncommitting it first. If `latest` names it, `latest`
    moves back to the previous committed tag (or is removed when there is none), so a crash while `tag` is being
    rewritten never leaves `latest` naming a half-written directory. Rank 0 only; no collective."""
    save_dir = Path(save_dir)
    tags = committed_tags(save_dir)
    if tag in tags:
        rest = [t for t in tags if t != tag]
        if latest_tag(save_dir) == tag:
            if rest:
                atomic_write(save_dir / "latest", rest[-1])
            else:
                (save_dir / "latest").unlink()
        atomic_write(save_dir / COMMITTED, "".join(f"{t}\n" for t in rest))
    if (save_dir / tag).exists():
        shutil.rmtree(save_dir / tag)


def prune_checkpoints(save_dir: str | Path, keep: int) -> list[str]:
    """Keep the last `keep` committed tags (0: all) and the one `latest` names; remove the other committed tags and
    every uncommitted loop-tag directory (a crashed save). Returns the removed tags. Rank 0 only; no collective."""
    save_dir = Path(save_dir)
    latest = latest_tag(save_dir)
    tags = committed_tags(save_dir)
    kept = set(tags[-keep:] if keep else tags) | ({latest} if latest else set())
    on_disk = [d.name for d in save_dir.iterdir() if d.is_dir()] if save_dir.is_dir() else []
    removed = [t for t in tags if t not in kept] + \
              sorted((name for name in on_disk if tag_order(name) and name not in tags and name not in kept),
                     key=tag_order)
    if save_dir.is_dir() and (removed or (save_dir / COMMITTED).is_file()):
        # The list first: a crash after it leaves the removed directories uncommitted, removed next time.
        atomic_write(save_dir / COMMITTED, "".join(f"{t}\n" for t in tags if t in kept))
    for tag in removed:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
    return removed


def save_checkpoint(engine, save_dir: str | Path, tag: str, client_state: dict[str, Any], *, keep: int = 0,
                    fingerprint: dict[str, Any] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Save and commit checkpoint `tag`, then keep only the last `keep` committed ones (0: all). Collective: every
    rank must call it.

    `fingerprint` (see nested_reft_ds.fingerprint) is recorded in the tag directory for `load_checkpoint` to check;
    `write_extra(tag_dir)` writes more into the tag directory before the commit and is called on every rank (it
    may be collective, e.g. `save_reference`). An earlier copy of `tag` is removed first (`clear_tag`)."""
    save_dir = Path(save_dir)
    rank0 = engine.global_rank == 0
    try:
        if rank0:
            save_dir.mkdir(parents=True, exist_ok=True)
            clear_tag(save_dir, tag)
        barrier()  # no rank writes into `tag` before its earlier copy is gone
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
        if write_extra is not None:
            write_extra(save_dir / tag)
        if rank0 and fingerprint is not None:
            write_fingerprint(save_dir / tag, fingerprint)
    except Exception as error:
        full = disk_full(error, save_dir / tag)  # before the partial files are removed: they fill the disk
        # Uncommitted, so never chosen; removed so that it neither lingers nor fills the disk again on a rerun.
        shutil.rmtree(save_dir / tag, ignore_errors=True)
        if full:
            raise no_space_error(error, save_dir / tag) from error
        raise
    barrier()  # every rank's shard is on disk before `latest` moves
    if rank0:
        try:
            _commit(save_dir, tag)
        except OSError as error:
            if error.errno in NO_SPACE:
                raise no_space_error(error, save_dir / "latest") from error
            raise
        prune_checkpoints(save_dir, keep)
    barrier()
    return save_dir / tag


def remove_uncommitted(save_dir: str | Path) -> list[str]:
    """Remove loop-tag directories no commit records (saves that died before their commit). Nothing is removed when
    the directory holds no commit record at all (no `latest`, no `committed_tags`): which of its tags were complete
    is then unknown. Rank 0 only, while it holds the run directory; returns the removed tags."""
    save_dir = Path(save_dir)
    if latest_tag(save_dir) is None and not (save_dir / COMMITTED).is_file():
        return []
    return prune_checkpoints(save_dir, keep=0)


def make_current(save_dir: str | Path, tag: str) -> None:
    """Commit `tag` again, so that `latest` names it and it is the newest in `committed_tags` (a run resumed from an
    older tag continues from there after a crash too). Rank 0 only."""
    _commit(Path(save_dir), tag)


def resume_candidates(save_dir: str | Path) -> tuple[list[str], str | None]:
    """The committed tags of `save_dir` to resume from, in the order to try them (the one `latest` names, then the
    others, newest commit first), and a note when `latest` itself cannot be followed (missing, empty, or naming no
    directory). A directory whose tags no commit record covers is a ConfigError: which were complete is unknown."""
    save_dir = Path(save_dir)
    latest = save_dir / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    tags = committed_tags(save_dir)
    if not tags:
        unrecorded = sorted((d.name for d in save_dir.iterdir() if d.is_dir() and tag_order(d.name)),
                            key=tag_order) if save_dir.is_dir() else []
        if unrecorded and not named and not (save_dir / COMMITTED).is_file():
            raise ConfigError(f"{str(save_dir)!r} holds checkpoints ({', '.join(unrecorded)}) but no record of which "
                              f"were committed (no 'latest', no '{COMMITTED}'): resume one with --resume TAG, or "
                              "start afresh with --resume none --overwrite")
        return [], None
    note = None
    if named == "":
        note = f"{str(latest)!r} is empty"
    elif named is None:
        note = f"{str(latest)!r} is missing"
    elif named not in tags:
        note = f"{str(latest)!r} names {named!r}, which is not a checkpoint there"
    return ([named] if named in tags else []) + [t for t in reversed(tags) if t != named], note


def damaged_files(tag_dir: str | Path, rank: int) -> list[str]:
    """'<path> (<what is wrong>)' for each file of checkpoint `tag_dir` that rank `rank` reads and cannot: a missing
    model-states file or own optimizer shard, a truncated or empty torch file (its zip directory, at the end, is
    gone), an unreadable fingerprint. Cheap: reads no tensor data. Files of other ranks are theirs to check."""
    tag_dir = Path(tag_dir)
    problems = []
    files = sorted(p for p in tag_dir.rglob("*.pt") if p.is_file())
    if not model_states_files(tag_dir):
        problems.append(f"{tag_dir / 'mp_rank_00_model_states.pt'} (missing)")
    if has_zero_optimizer_shards(tag_dir) and not list(tag_dir.glob(f"zero_pp_rank_{rank}_*optim_states.pt")):
        problems.append(f"{tag_dir / f'zero_pp_rank_{rank}_mp_rank_00_optim_states.pt'} (missing)")
    for path in files:
        owner = RANK_FILE.match(path.name)
        if owner and int(owner.group(1) or owner.group(2)) != rank:
            continue
        if path.stat().st_size == 0:
            problems.append(f"{path} (empty)")
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
                if not pickles:
                    raise zipfile.BadZipFile("no data.pkl")
                archive.read(pickles[0])  # checks its CRC
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            problems.append(f"{path} (truncated or corrupt: {error})")
    fingerprint = tag_dir / FINGERPRINT_FILE
    if fingerprint.is_file():
        try:
            read_fingerprint(tag_dir)
        except ValueError as error:
            problems.append(f"{fingerprint} (unreadable: {error})")
    return problems


def load_first_loadable(engine, save_dir: str | Path, tags: list[str], *, fingerprint: dict[str, Any] | None = None,
                        warn: Callable[[str], None] = lambda text: None) -> tuple[dict[str, Any], str]:
    """Load the first of `tags` (in `save_dir`) whose files every rank can read; returns (client state, tag).
    Collective: every rank checks its own files (`damaged_files`), the verdict is shared, and only a tag no rank
    finds damaged is loaded, so no rank is left waiting inside DeepSpeed's load for one that failed. Each tag
    passed over is `warn`ed in one line naming its file; a ConfigError when none loads. A fingerprint that differs
    is refused (ConfigError) rather than passed over: the run, not the checkpoint, has changed."""
    save_dir = Path(save_dir)
    failures = []
    for index, tag in enumerate(tags):
        problems = [p for rank_problems in all_gather_object(damaged_files(save_dir / tag, engine.global_rank))
                    for p in rank_problems]
        if problems:
            failures.append(f"{tag}: {problems[0]}")
            nxt = f"falling back to {tags[index + 1]}" if index + 1 < len(tags) else "no older checkpoint is left"
            warn(f"checkpoint file {problems[0]} cannot be loaded; {nxt}")
            continue
        return load_checkpoint(engine, save_dir, tag, fingerprint=fingerprint), tag
    raise ConfigError(f"no checkpoint in {str(save_dir)!r} can be loaded ({'; '.join(failures)}); start afresh with "
                      "--resume none --overwrite")


def latest_tag(save_dir: str | Path) -> str | None:
    """The tag `<save_dir>/latest` names; None when it is missing or empty."""
    latest = Path(save_dir) / "latest"
    return (latest.read_text().strip() or None) if latest.is_file() else None


def load_checkpoint(engine, save_dir: str | Path, tag: str | None = None, *,
                    fingerprint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Load `tag` (default: the committed latest) into `engine`; returns our client state, or None when there
    is no checkpoint. Collective.

    `fingerprint`: the current run's (`fingerprint.run_fingerprint`); before anything is loaded, a checkpoint that
    recorded a different one is refused with a ConfigError naming each differing key and both values."""
    tag = tag or latest_tag(save_dir)
    if tag is None:
        return None
    if not (Path(save_dir) / tag).is_dir():
        raise ConfigError(f"checkpoint {str(Path(save_dir) / tag)!r} does not exist")
    if fingerprint is not None:
        check_compatible(read_fingerprint(Path(save_dir) / tag), fingerprint,
                         f"cannot resume from {str(Path(save_dir) / tag)}")
    path, client_state = engine.load_checkpoint(str(save_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {tag!r} from {str(save_dir)!r}")
    return client_state


def consolidated_state_dict(save_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage (0/1/2/3), in one process, no GPU needed."""
    tag = tag or latest_tag(save_dir)
    if tag is None:
        raise ConfigError(f"no committed checkpoint in {str(save_dir)!r} (no 'latest' file)")
    checkpoint = Path(save_dir) / tag
    if has_zero_optimizer_shards(checkpoint):  # ZeRO 1-3: weights live in optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    model_states = model_states_files(checkpoint)
    if not model_states:
        raise ConfigError(f"{str(checkpoint)!r} holds no DeepSpeed model states")
    state = load_model_states(model_states[0])["module"]
    return {key: value.float() for key, value in state.items()}


def _check_export_target(output_dir: Path, overwrite: bool) -> None:
    """Refuse an existing `output_dir` (a file, or a directory holding anything) unless `overwrite`, and one whose
    parent cannot hold the temporary directory the export is written into."""
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        kind = "a non-empty directory" if output_dir.is_dir() else "a file"
        raise ConfigError(f"--output {str(output_dir)!r} exists ({kind}); pass --overwrite to replace it")
    parent = output_dir.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"--output {str(output_dir)!r}: {str(parent)!r} is a file, not a directory")


def _replace_with(staged: Path, output_dir: Path) -> None:
    """Move the finished export `staged` to `output_dir`; an existing `output_dir` is moved aside first and removed
    only once the new one is in place, so a failure in between leaves the old export, not a mix."""
    aside = None
    if output_dir.exists() or output_dir.is_symlink():
        aside = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, aside)
    try:
        os.replace(staged, output_dir)
    except OSError:
        if aside is not None:
            os.replace(aside, output_dir)
        raise
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()


def export_hf_model(save_dir: str | Path, output_dir: str | Path, tag: str | None = None,
                    base_model: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a consolidated Hugging Face model (+ tokenizer) from a checkpoint of any ZeRO stage.

    `base_model` supplies the architecture config and tokenizer; by default it is the run's own model
    (`model.path` recorded in the checkpoint, or the embedded model built into <output_dir>/base_model).
    An existing `output_dir` (a file or a non-empty directory) is refused unless `overwrite`. The model is written
    into a temporary sibling directory, renamed to `output_dir` once complete (replacing the old one only then), so
    a failed write (a full disk, say) leaves no partial export; it raises ConfigError naming the cause.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..model import check_model_dir, load_tokenizer

    save_dir, output_dir = Path(save_dir), Path(output_dir)
    _check_export_target(output_dir, overwrite)
    tag = tag or latest_tag(save_dir)
    if tag is None or not (save_dir / tag).is_dir():
        raise ConfigError(f"no committed checkpoint {tag or ''!s} in {str(save_dir)!r}")
    if base_model is None:
        model_states = model_states_files(save_dir / tag)
        saved = load_model_states(model_states[0]) if model_states else {}
        recorded = saved.get("config", {}).get("model", {}).get("path")
        base_model = recorded or save_dir.parent / "base_model"
    base_model = Path(base_model)
    if not (base_model / "config.json").is_file():
        raise ConfigError(f"base model {str(base_model)!r} not found; pass --base-model")
    check_model_dir(base_model, "--base-model")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model), dtype=torch.float32)
    result = model.load_state_dict(consolidated_state_dict(save_dir, tag), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ConfigError(f"checkpoint does not match {str(base_model)!r}: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    if (base_model / "generation_config.json").is_file():  # e.g. several EOS ids, which the model config lacks
        model.generation_config = GenerationConfig.from_pretrained(base_model)
    staged = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    try:
        staged.mkdir(parents=True)
        model.save_pretrained(staged)
        load_tokenizer(base_model).save_pretrained(staged)
        _replace_with(staged, output_dir)
    except (OSError, SafetensorError) as error:  # safetensors reports its own I/O errors as SafetensorError
        cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC or "os error 28" in cause
        raise ConfigError(f"could not write the export to {str(output_dir)!r}: {cause}{' (disk full)' if full else ''}"
                          "; nothing was written there") from None
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return output_dir
