"""benchmarks/ is a package run as ``python -m benchmarks.<name>`` from the repository root: every module imports
under that name without touching sys.path, every script is documented in benchmarks/README.md with its command and
answers ``--help``, and the commands the docs and run_all.sh give name modules that exist."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import runpy
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCHMARKS = REPO / "benchmarks"
MODULES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
SCRIPTS = [m for m in MODULES if 'if __name__ == "__main__":' in (BENCHMARKS / f"{m}.py").read_text()]
HELPERS = ["common", "launch", "memory", "protocol"]
README = (BENCHMARKS / "README.md").read_text()
COMMAND = re.compile(r"python -m benchmarks\.(\w+)")


def test_the_scripts_and_helpers_are_the_known_ones():
    assert (BENCHMARKS / "__init__.py").is_file()
    assert sorted(set(MODULES) - set(SCRIPTS)) == HELPERS, "a new helper module: name it in HELPERS and the README"


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports_as_part_of_the_package_without_sys_path(name):
    assert "sys.path" not in (BENCHMARKS / f"{name}.py").read_text()
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__file__ == str(BENCHMARKS / f"{name}.py")


@pytest.mark.parametrize("name", MODULES + ["run_all.sh"])
def test_every_file_has_a_readme_section(name):
    filename = name if name.endswith(".sh") else f"{name}.py"
    assert re.search(rf"^#+ {re.escape(filename)}$", README, re.M), f"no section '### {filename}' in benchmarks/README.md"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_is_documented_with_its_command_and_answers_help(name, monkeypatch):
    assert f"python -m benchmarks.{name}" in README
    # as ``python -m`` runs it, in this process (the imports are shared, so this is cheap)
    monkeypatch.setattr(sys, "argv", [f"benchmarks.{name}", "--help"])
    monkeypatch.delitem(sys.modules, f"benchmarks.{name}", raising=False)  # run afresh, as __main__
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None) and "usage:" in out.getvalue()


def test_a_script_runs_as_a_module_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.main_comparison", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--threads" in proc.stdout and "--teacher" in proc.stdout


def test_commands_in_the_docs_and_run_all_name_existing_modules():
    docs = [REPO / "README.md", BENCHMARKS / "README.md", BENCHMARKS / "run_all.sh",
            *(p for p in (REPO / "docs").glob("*.md") if p.name != "results_128_seeds.md"),  # an archive, as written
            *REPO.glob("models/*/README.md")]
    wrong = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in docs for m in COMMAND.finditer(p.read_text())
             if m.group(1) not in SCRIPTS]
    old_style = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in docs
                 for m in re.finditer(r"python benchmarks/\w+\.py", p.read_text())]
    assert not wrong and not old_style, (wrong, old_style)
    assert set(COMMAND.findall((BENCHMARKS / "run_all.sh").read_text())) >= {
        "core_ablation", "peers", "main_comparison", "make_protocol_results"}
