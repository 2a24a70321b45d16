"""The import rules of docs/architecture.md, checked on the source, and the package working from a plain install.

- The library (everything in nested_reft_ds/ but recipes/, cli.py and the two module entries) never imports a
  recipe.
- Only engine/ imports deepspeed or torch.distributed; the pure layers (config, data, reward, nested, rl, ...)
  import neither, at any depth of their own imports.
- `nested-reft --help` and `nested-reft eval` on a plain process never import DeepSpeed.
- A non-editable `pip install .` trains and runs the benchmarks' CLI from outside the source tree.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nested_reft_ds"
ENTRIES = {PACKAGE / "cli.py", PACKAGE / "train.py", PACKAGE / "evaluate.py"}  # dispatch to recipes by design
RECIPES = PACKAGE / "recipes"
ENGINE = PACKAGE / "engine"
FORBIDDEN_OUTSIDE_ENGINE = ("deepspeed", "torch.distributed")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if RECIPES not in p.parents and p not in ENTRIES]


def test_the_library_never_imports_a_recipe():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.startswith("nested_reft_ds.recipes"))
                 for p in library_files()}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_engine_imports_deepspeed_or_torch_distributed():
    offenders = {}
    for path in library_files():
        if ENGINE in path.parents:
            continue
        bad = sorted(m for m in imported_modules(path)
                     if m.startswith(FORBIDDEN_OUTSIDE_ENGINE) or m.startswith("nested_reft_ds.engine"))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, offenders


def test_recipes_reach_deepspeed_only_through_engine():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.startswith("deepspeed"))
                 for p in RECIPES.glob("*.py") if p.name != "comm_stats.py"}  # instrumentation wraps torch itself
    assert not {k: v for k, v in offenders.items() if v}


def _modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(out.stdout.split())


def test_cli_help_and_plain_eval_do_not_import_deepspeed():
    help_only = _modules_after("import contextlib, io\nfrom nested_reft_ds import cli\n"
                               "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                               "    cli.main(['--help'])")
    assert "deepspeed" not in help_only and not any(m.startswith("nested_reft_ds.recipes.") for m in help_only)
    eval_help = _modules_after("import contextlib, io\nfrom nested_reft_ds import cli\n"
                               "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                               "    cli.main(['eval', '--help'])")
    assert "nested_reft_ds.recipes.evaluate" in eval_help and "deepspeed" not in eval_help


def test_a_plain_pip_install_trains_and_runs_the_bench_cli(tmp_path):
    """`pip install .` (not editable) into a fresh venv that reuses this interpreter's packages; then, from a
    directory outside the source tree, `nested-reft train` on a few steps and `nested-reft bench rollout --help`."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__"))
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                             capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import nested_reft_ds; print(nested_reft_ds.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr  # the installed copy, not the source tree
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "run.yaml").write_text((REPO / "configs" / "tiny_zero3_2rank.yaml").read_text())
    train = subprocess.run([str(env_dir / "bin" / "nested-reft"), "train", "--config", "run.yaml",
                            "--set", "train.output_dir=out"], capture_output=True, text=True, cwd=work, env=env,
                           timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (work / "out" / "checkpoints" / "latest").read_text() == "rl_step2"
    bench = subprocess.run([str(env_dir / "bin" / "nested-reft"), "bench", "rollout", "--help"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert bench.returncode == 0 and "--modes" in bench.stdout, bench.stderr[-3000:]


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_module_entries_are_thin(name):
    """`python -m nested_reft_ds.train` / `.evaluate` are what launchers exec; the recipes live in recipes/."""
    source = (PACKAGE / f"{name}.py").read_text()
    assert f"from .recipes.{name} import main" in source and len(source.splitlines()) < 10


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_has_no_import_cycles():
    """Every import counts, also one inside a function (a cycle hidden behind an import at use is still a
    cycle: neither module can be read or tested without the other). An edge goes to the module named, or to the
    submodule a `from package import name` names."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in imported_modules(path) if m in files and m != name} for name, path in files.items()}
    # `from . import x` also names the package itself: keep only the most specific module of each import
    graph = {name: {m for m in deps if not any(o.startswith(m + ".") for o in deps)} for name, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_architecture_names_every_module():
    """docs/architecture.md is the map a newcomer reads first: every module of the package is on it."""
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py" and p.name not in text)
    assert not missing, f"modules docs/architecture.md does not name: {missing}"


def test_pure_layers_import_without_deepspeed_at_any_depth():
    """The import rule at run time (the AST test above checks the source): every library module outside engine/
    imports with `deepspeed` blocked and pulls in no torch.distributed-using engine code, and the verifier (which
    runs in worker processes) imports neither torch nor deepspeed."""
    pure = sorted(module_name(p) for p in library_files()
                  if ENGINE not in p.parents and p.name != "__init__.py" and p.parent.name != "engine")
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            f"for name in {pure!r}: __import__(name)\n"
            "assert not [m for m in sys.modules if m.startswith('nested_reft_ds.engine')], 'engine imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)
    verifier = ("import sys, nested_reft_ds.reward as r; r.math_equal('\\\\sqrt{4}', '2'); "
                "bad = [m for m in ('torch', 'deepspeed') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", verifier], check=True, cwd=REPO, timeout=120)
