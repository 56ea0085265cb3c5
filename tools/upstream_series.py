"""Edit the upstream patch series as git commits, and write it back as patch files.

Why: the patches of ``upstream/`` stack on the same lines of vLLM (each names what it depends
on), so fixing one by hand-editing a diff breaks the next. ``import`` turns the series into a
git branch over vLLM v0.33.0's source release (the PyPI sdist: code, tests, docs and vLLM's
own lint settings; one commit per patch, its message the pull request's text), where the usual
tools work (``git rebase -i``, ``commit --fixup``); ``export`` writes each commit back as
``upstream/NNNN-<name>.patch`` and rewrites ``series``.

The files carry no author: whoever submits a patch applies it as its author and signs it off
(vLLM's DCO check), with ``upstream/am.sh`` (``git am --signoff``).

    .venv/bin/python tools/upstream_series.py import   # -> build/upstream/work (branch series)
    .venv/bin/python tools/upstream_series.py export   # -> upstream/*.patch, upstream/series
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
UPSTREAM: Final = REPO / "upstream"
WORK: Final = REPO / "build" / "upstream" / "work"
SDIST_CACHE: Final = REPO / ".models" / "cache" / "sdist"
SDIST: Final = "vllm-0.33.0.tar.gz"
SDIST_SHA256: Final = "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112"
SIMPLE_INDEX: Final = "https://pypi.org/simple/vllm/"
# What of the release the series may touch, and what its checks read (lint settings).
BASE_PARTS: Final = ("vllm", "tests", "docs", "examples", "pyproject.toml")
BASE_TAG: Final = "v0.33.0"
SUBJECT: Final = re.compile(r"^Subject: \[PATCH[^\]]*\] (?P<title>.+)$")


def git(*args: str, cwd: Path = WORK, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def series_names() -> list[str]:
    lines = (UPSTREAM / "series").read_text().splitlines()
    return [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]


def split_patch(text: str) -> tuple[str, str]:
    """The commit message (title, blank line, body) and the diff of one patch file."""
    head, diff = text.split("\ndiff --git ", 1)
    lines = [line for line in head.splitlines() if not line.startswith("From:")]
    match = SUBJECT.match(lines[0])
    if match is None:
        raise SystemExit(f"no 'Subject: [PATCH ..]' line opens:\n{lines[0]}")
    body = "\n".join(lines[1:]).strip("\n")
    return f"{match['title']}\n\n{body}\n", "diff --git " + diff


def sdist() -> Path:
    """vLLM v0.33.0's source release, downloaded once from PyPI and checked by its digest."""
    path = SDIST_CACHE / SDIST
    if not path.exists():
        request = urllib.request.Request(
            SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            files = json.load(answer)["files"]
        (url,) = [entry["url"] for entry in files if entry["filename"] == SDIST]
        SDIST_CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as answer, partial.open("wb") as out:
            shutil.copyfileobj(answer, out)
        partial.rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        path.unlink()
        raise SystemExit(f"{SDIST}: SHA-256 {digest}, expected {SDIST_SHA256}")
    return path


def unpack_base(root: Path, parts: tuple[str, ...] = BASE_PARTS) -> None:
    """``parts`` of the release (by default all the series touches), at ``root``."""
    with tarfile.open(sdist()) as archive:
        prefix = SDIST.removesuffix(".tar.gz") + "/"
        members = []
        for member in archive.getmembers():
            name = member.name.removeprefix(prefix)
            if member.isfile() and name.split("/", 1)[0] in parts:
                member.name = name
                members.append(member)
        archive.extractall(root, members=members, filter="data")


def release_repo(root: Path, name: str, email: str, branch: str = "main") -> None:
    """A fresh git repository at ``root`` whose one commit is the release's parts, committed
    as ``name <email>``, a throwaway identity kept in the repository's own config (where
    ``upstream/am.sh`` also reads it)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for args in (("init", "-q", "-b", branch), ("config", "user.name", name),
                 ("config", "user.email", email)):  # fmt: skip
        subprocess.run(["git", *args], cwd=root, check=True)
    unpack_base(root)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    message = f"vLLM {BASE_TAG} (source release: {', '.join(BASE_PARTS)})"
    subprocess.run(["git", "commit", "-qm", message], cwd=root, check=True)


def do_import() -> None:
    release_repo(WORK, "upstream-series", "series@localhost", branch="series")
    git("tag", BASE_TAG)
    for name in series_names():
        message, diff = split_patch((UPSTREAM / name).read_text())
        git("apply", "--index", "--whitespace=nowarn", "-", stdin=diff)
        git("commit", "-q", "-F", "-", stdin=message)
        print(f"imported {name}")
    print(f"branch 'series' in {WORK}: {len(series_names())} commits over {BASE_TAG}")


def slug(title: str) -> str:
    words = re.sub(r"\[[^\]]*\]", "", title).lower()
    return "-".join(re.findall(r"[a-z0-9_]+", words))[:60].strip("-")


def do_export() -> None:
    commits = git("rev-list", "--reverse", f"{BASE_TAG}..series").split()
    kept = {}  # a patch keeps its file name while its title stays
    for old in UPSTREAM.glob("*.patch"):
        title = split_patch(old.read_text())[0].split("\n", 1)[0]
        kept[title] = old.stem.split("-", 1)[1]
        old.unlink()
    names = []
    for index, commit in enumerate(commits, start=1):
        title = git("log", "-1", "--format=%s", commit).strip()
        body = git("log", "-1", "--format=%b", commit).strip("\n")
        diff = git("diff", "--full-index", "--no-renames", f"{commit}^", commit)
        name = f"{index:04d}-{kept.get(title) or slug(title)}.patch"
        text = f"Subject: [PATCH {index:02d}] {title}\n\n{body}\n\n{diff}"
        (UPSTREAM / name).write_text(text)
        names.append(name)
        print(f"wrote upstream/{name}")
    (UPSTREAM / "series").write_text("".join(f"{name}\n" for name in names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["import", "export"])
    args = parser.parse_args()
    do_import() if args.action == "import" else do_export()
    return 0


if __name__ == "__main__":
    sys.exit(main())
