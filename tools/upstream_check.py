"""Build, apply and test the upstream patch series of ``upstream/`` against vLLM 0.33.0.

Why: the series is meant for vLLM itself, so it is checked on vLLM's own code with this plugin
off (``VLLM_PLUGINS=""``): every patch must apply to vLLM v0.33.0's source release with only
the patches it says it depends on, the whole series must go in as a submitter would apply it
(``upstream/am.sh``: ``git am --signoff``), every Python file it touches must pass vLLM's own
ruff check and format at the version vLLM's pre-commit pins, the patches' own tests must pass
on the patched vLLM, and our hostile end-to-end cases must show the patched built-in alive
after every case, answering each case the series claims as claimed.

Trees (all under ``build/upstream/``, git-ignored; the shared venvs are never written):
- ``pristine-0.33.0/``: vLLM v0.33.0's source release (the PyPI sdist: code, tests, docs,
  ``pyproject.toml``), a git repository the series is applied to with ``upstream/am.sh``;
- ``ruff-<version>/``: the ruff that vLLM's ``.pre-commit-config.yaml`` pins;
- ``pristine-0.32.0/``: ``.venv``'s vllm Python files; reports which patches also apply to 0.32;
- ``site/``: the harness's vllm package (0.33 Python over 0.32's CPU kernels; ``.py`` files
  copied, everything else linked), with the series applied. ``git apply`` at this root also
  creates ``site/tests/...``, the patches' tests in vLLM's layout, run from here. The harness
  venv's Python runs with ``PYTHONPATH=site`` so the patched package shadows the installed one;
- ``hub/``: a Hugging Face cache whose snapshots are links to the local test models, so the
  patches' tests can name small hub models (``MODEL_STAND_INS``) with ``HF_HUB_OFFLINE=1``.
  ``site/tests/utils.py`` is a small stand-in for vLLM's ``tests/utils.py`` (only
  ``RemoteOpenAIServer``), written only where vLLM's own is absent (a wheel has no tests).

    .venv-vllm033/bin/python tools/upstream_check.py [--apply-only] [--tests-only]
        [--hostile-only] [--before] [--per-patch] [-k EXPR]
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import upstream_series

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO / "upstream"
BUILD = REPO / "build" / "upstream"
SITE = BUILD / "site"
HUB = BUILD / "hub"
PRISTINE_033 = BUILD / "pristine-0.33.0"
PRISTINE_032 = BUILD / "pristine-0.32.0"
HARNESS = REPO / ".venv-vllm033"
VENV = REPO / ".venv"
MODELS = REPO / ".models"
# Hub names used by the patches' tests -> the local model standing in for each.
MODEL_STAND_INS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "tiny-llama-test",
    "facebook/opt-125m": "tiny-llama-test",  # the model of vLLM's prompt_embeds tests
}
STAND_IN_REVISION = "0" * 40
# What vLLM's tests/conftest.py imports beyond the harness venv, installed beside it.
TEST_DEPS = ("tblib", "pytest-asyncio")
TESTDEPS = BUILD / "testdeps"
# The ruff of vLLM v0.33.0's .pre-commit-config.yaml (ruff-pre-commit rev), run with the
# release's own pyproject.toml settings.
VLLM_RUFF = "0.14.0"
# Identity of the throwaway pristine tree's commits only (am.sh reads it from git config).
CHECK_IDENTITY = ("upstream-check", "upstream-check@localhost")
# "Depends on: name, name" (continued on lines that start with a name), then "(...)".
DEPENDS = re.compile(r"^Depends on: (?P<names>(?:[^(\n]|\n(?=[a-z0-9]))+)", re.MULTILINE)
# "Regression guards: test_a, test_b": tests a patch adds that pass before it by design (a
# parity check of behaviour the patch must keep); ``--before`` runs them and lets them pass.
GUARDS = re.compile(r"^Regression guards: (?P<names>[^\n]+)", re.MULTILINE)


def log(message: str) -> None:
    print(f"upstream_check: {message}", flush=True)


@functools.cache
def series() -> list[Path]:
    """The patches in merge order (read once per run)."""
    return [UPSTREAM / name for name in upstream_series.series_names()]


def site_packages(venv: Path) -> Path:
    (found,) = sorted(venv.resolve().glob("lib/python3*/site-packages"))
    return found


def git_apply(root: Path, patch: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``git apply`` with ``root`` as the tree root (its own empty repository, so the paths of
    the patch are relative to ``root`` and not to this worktree)."""
    return subprocess.run(
        ["git", "apply", "--whitespace=nowarn", *extra, str(patch)],
        cwd=root,
        capture_output=True,
        text=True,
    )


def fresh_tree(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)


def unpack_release(root: Path) -> None:
    """A git repository of vLLM v0.33.0's source release at ``root``."""
    upstream_series.release_repo(root, *CHECK_IDENTITY)


def reset_tree(root: Path) -> None:
    """``root`` back at its last commit, without files the patches added."""
    subprocess.run(["git", "reset", "-q", "--hard", "HEAD"], cwd=root, check=True)
    subprocess.run(["git", "clean", "-qfd"], cwd=root, check=True)


def declared_dependencies(patch: Path) -> list[Path]:
    """The patches ``patch`` says it depends on, and theirs, in series order."""
    by_name = {p.stem.split("-", 1)[1]: p for p in series()}
    needed: set[Path] = set()
    pending = [patch]
    while pending:
        message = upstream_series.split_patch(pending.pop().read_text())[0]
        match = DEPENDS.search(message)
        for name in re.findall(r"[a-z0-9][a-z0-9_-]*", match["names"]) if match else []:
            if name not in by_name:
                raise SystemExit(f"{patch.name}: 'Depends on: {name}' names no patch")
            if by_name[name] not in needed:
                needed.add(by_name[name])
                pending.append(by_name[name])
    return [p for p in series() if p in needed]


def check_declared_stack(root: Path) -> None:
    """Each patch applies to the release with only the patches it declares."""
    for patch in series():
        reset_tree(root)
        deps = declared_dependencies(patch)
        for dep in deps:
            git_apply(root, dep).check_returncode()
        result = git_apply(root, patch, "--check")
        if result.returncode != 0:
            names = [d.name for d in deps] or "nothing"
            raise SystemExit(f"{patch.name} does not apply over {names}:\n{result.stderr}")
        log(f"  {patch.name} applies over {[d.name[:4] for d in deps] or 'the release alone'}")
    reset_tree(root)


def apply_as_submitter(root: Path) -> None:
    """The whole series with ``upstream/am.sh`` (``git am --signoff``), as documented."""
    done = subprocess.run(
        [str(UPSTREAM / "am.sh"), str(root)], capture_output=True, text=True, cwd=REPO
    )
    if done.returncode != 0:
        raise SystemExit(f"upstream/am.sh failed:\n{done.stdout}{done.stderr}")
    log_lines = subprocess.run(
        [
            "git",
            "log",
            "--format=%(trailers:key=Signed-off-by,valueonly)%x00",
            "-n",
            str(len(series())),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    unsigned = [entry for entry in log_lines[: len(series())] if not entry.strip()]
    if unsigned:
        raise SystemExit(f"{len(unsigned)} commit(s) without Signed-off-by after am.sh")
    log(f"  am.sh: {len(series())} commits, each signed off")


def pip_target(target: Path, *requirements: str) -> Path:
    """``requirements`` installed once into ``target`` (no dependencies), beside the venvs."""
    if not target.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
             str(target), *requirements],
            check=True,
        )  # fmt: skip
    return target


def vllm_ruff() -> Path:
    return pip_target(BUILD / f"ruff-{VLLM_RUFF}", f"ruff=={VLLM_RUFF}") / "bin" / "ruff"


def lint_touched(root: Path) -> int:
    """vLLM's ruff check and format (its settings, its pinned ruff) on every Python file the
    series adds or changes."""
    touched = subprocess.run(
        [
            "git",
            "diff",
            "--name-only",
            "--diff-filter=AM",
            "HEAD~" + str(len(series())),
            "--",
            "*.py",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    ruff = str(vllm_ruff())
    status = 0
    for cmd in ([ruff, "check", "--output-format", "concise"], [ruff, "format", "--check"]):
        done = subprocess.run([*cmd, *touched], cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"{' '.join(cmd[1:2])} on the files the series touches:\n{done.stdout}")
            status = 1
    log(
        f"  ruff {VLLM_RUFF} check and format, vLLM's settings: {len(touched)} files, "
        f"{'clean' if status == 0 else 'NOT clean'}"
    )
    return status


def copy_package(source: Path, root: Path, *, link_others: bool) -> None:
    """Copy the ``.py`` files of the vllm package at ``source``; link (or skip) the rest."""
    fresh_tree(root)
    for path in source.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        target = root / "vllm" / path.relative_to(source)
        if path.suffix == ".py":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        elif link_others:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)


def apply_in_order(root: Path, label: str, *, required: bool) -> list[str]:
    """Apply the code (``vllm/``) of each patch in turn; return the names that applied (all,
    when ``required``). Used on an installed package, which has no tests or docs."""
    applied = []
    for patch in series():
        result = git_apply(root, patch, "--check", "--include=vllm/*")
        if result.returncode != 0:
            if required:
                raise SystemExit(f"{patch.name} does not apply to {label}:\n{result.stderr}")
            log(f"  {label}: {patch.name} does NOT apply ({result.stderr.strip().splitlines()[0]})")
            continue
        git_apply(root, patch, "--include=vllm/*").check_returncode()
        applied.append(patch.name)
        log(f"  {label}: {patch.name} applies")
    return applied


def build_hub() -> None:
    """A Hugging Face cache holding the stand-ins under their hub names."""
    for name, local in MODEL_STAND_INS.items():
        model = MODELS / local
        if not (model / "config.json").exists():
            subprocess.run(
                [sys.executable, str(REPO / "tools" / "build_test_model.py"), "--out", str(model)],
                check=True,
            )
        repo = HUB / f"models--{name.replace('/', '--')}"
        snapshot = repo / "snapshots" / STAND_IN_REVISION
        if snapshot.exists():
            shutil.rmtree(snapshot)
        snapshot.mkdir(parents=True)
        for file in model.iterdir():
            (snapshot / file.name).symlink_to(file.resolve())
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(STAND_IN_REVISION)


def build_site(*, upto: int | None = None, tests_of: int | None = None, site: Path = SITE) -> None:
    """``site/``: the harness's vllm with the first ``upto`` patches (all by default), plus
    the tests of patch ``tests_of`` alone when given (to run a test before its fix)."""
    copy_package(site_packages(HARNESS) / "vllm", site, link_others=True)
    # The release's own tests (and the docs and examples they and the patches touch): the
    # patches extend vLLM's test files, run with vLLM's conftest and tests/utils.py.
    upstream_series.unpack_base(site, parts=("tests", "docs", "examples"))
    patches = series()
    for patch in patches[: len(patches) if upto is None else upto]:
        git_apply(site, patch).check_returncode()
    if tests_of is not None:
        git_apply(site, patches[tests_of], "--include=tests/*").check_returncode()
    (site / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")


def check_env(site: Path = SITE) -> dict[str, str]:
    """The environment the patched built-in runs in: plugin off, stand-in hub, patched vllm."""
    env = dict(os.environ)
    env.update(
        VLLM_PLUGINS="",
        HF_HUB_CACHE=str(HUB),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(site), str(test_deps())]),
        PATH=os.pathsep.join([str(HARNESS / "bin"), os.environ.get("PATH", "")]),
    )
    env.setdefault("VLLM_CACHE_ROOT", str(BUILD / "vllm-cache"))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the machine is shared
    return env


def test_deps() -> Path:
    return pip_target(TESTDEPS, *TEST_DEPS)


def harness_python() -> str:
    return str(HARNESS / "bin" / "python")


def run_tests(paths: list[str], extra: list[str]) -> int:
    cmd = [harness_python(), "-m", "pytest", *paths, "-q", *extra]
    log(f"running {' '.join(cmd[1:])} in {SITE}")
    return subprocess.run(cmd, cwd=SITE, env=check_env()).returncode


def patch_tests(patch: Path) -> list[str]:
    """The tests a patch brings: each test file it adds, and in each of vLLM's test files it
    extends, the test functions it adds (the rest of such a file may need hub models)."""
    tests: list[str] = []
    current, is_new = "", False
    for line in patch.read_text().splitlines():
        if line.startswith("--- "):
            is_new = line == "--- /dev/null"
        elif line.startswith("+++ b/"):
            path = line[len("+++ b/") :]
            current = path if path.startswith("tests/") and path.endswith(".py") else ""
            if current and is_new:
                tests.append(current)
        elif current and not is_new:
            added = re.match(r"^\+(?:async )?def (test_\w+)", line)
            if added:
                tests.append(f"{current}::{added[1]}")
    return tests


def regression_guards(patch: Path) -> set[str]:
    """The test functions ``patch`` names as regression guards."""
    match = GUARDS.search(upstream_series.split_patch(patch.read_text())[0])
    return set(re.findall(r"test_\w+", match["names"])) if match else set()


def is_guard(test: str, guards: set[str]) -> bool:
    return test.rpartition("::")[2] in guards


def test_files() -> list[str]:
    return sorted({t for patch in series() for t in patch_tests(patch)})


def before(extra: list[str]) -> int:
    """Every test file of the series, on vLLM without the series, must fail."""
    build_site(upto=0)
    for patch in series():
        git_apply(SITE, patch, "--include=tests/*").check_returncode()
    guards = set().union(*(regression_guards(p) for p in series()))
    passing = [test for test in test_files() if run_tests([test], extra) == 0]
    for test in passing:
        guard = " (a regression guard: allowed)" if is_guard(test, guards) else ""
        log(f"{test} passes WITHOUT the series{guard}")
    return 1 if any(not is_guard(test, guards) for test in passing) else 0


def per_patch(extra: list[str]) -> int:
    """For each patch: its tests fail with the patches before it, and pass with it (slow)."""
    failures = []
    for index, patch in enumerate(series()):
        tests = patch_tests(patch)
        guards = regression_guards(patch)
        must_fail = [test for test in tests if not is_guard(test, guards)]
        if not tests:
            log(f"{patch.name}: no tests")
            continue
        build_site(upto=index, tests_of=index)
        if must_fail and run_tests(must_fail, extra) == 0:
            failures.append(f"{patch.name}: its tests pass WITHOUT the fix")
        build_site(upto=index + 1)
        if run_tests(tests, extra) != 0:
            failures.append(f"{patch.name}: its tests fail WITH the fix")
    for failure in failures:
        log(failure)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apply-only", action="store_true", help="only build and apply")
    parser.add_argument("--tests-only", action="store_true", help="skip the hostile run")
    parser.add_argument("--hostile-only", action="store_true", help="skip the patches' tests")
    parser.add_argument("--before", action="store_true", help="first: tests fail without it")
    parser.add_argument("--per-patch", action="store_true", help="before/after each patch")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for the tests")
    args = parser.parse_args()
    extra = ["-k", args.keyword] if args.keyword else []

    log("vLLM v0.33.0 source release: each patch over its declared dependencies")
    unpack_release(PRISTINE_033)
    check_declared_stack(PRISTINE_033)
    log("the whole series as a submitter applies it")
    apply_as_submitter(PRISTINE_033)
    lint_status = lint_touched(PRISTINE_033)
    log("vLLM 0.32.0 (.venv): which patches also apply")
    copy_package(site_packages(VENV) / "vllm", PRISTINE_032, link_others=False)
    on_032 = apply_in_order(PRISTINE_032, "0.32.0", required=False)
    log(f"{len(on_032)}/{len(series())} patches also apply to 0.32.0: {on_032}")
    build_hub()
    build_site()
    if args.apply_only:
        return lint_status
    status = lint_status
    if args.before:
        status |= before(extra)
    if args.per_patch:
        status |= per_patch(extra)
    if args.before or args.per_patch:
        build_site()
    if not args.hostile_only:
        status |= run_tests(test_files(), extra)
    if not args.tests_only:
        cmd = [harness_python(), str(REPO / "tools" / "upstream_hostile.py")]
        log("hostile cases against the patched built-in")
        status |= subprocess.run(cmd, cwd=REPO, env=check_env()).returncode
    log("PASS" if status == 0 else "FAIL")
    return status


if __name__ == "__main__":
    sys.exit(main())
