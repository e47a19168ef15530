#!/usr/bin/env python
"""What the lent GPU machine lacks, in one folder that travels with the run.

The GPU machine (one H200, Python 3.12 on x86-64 Linux) has torch, torchvision, rich, tensorboard and
about 200 other distributions (scripts/gpu_device_packages.txt), and no package registry. This builds
everything else cnnlab needs to run there:

    <bundle>/wheels/   cnnlab's own wheel (built from this checkout) and a wheel of every distribution
                       in cnnlab's requirement closure the machine does not have (hydra-core, omegaconf,
                       antlr4-python3-runtime, optuna, ...), at the versions installed here, for cp312
                       manylinux x86-64
    <bundle>/data/     Fashion-MNIST's four IDX files, in torchvision's layout (FashionMNIST/raw/)
    <bundle>/SOURCE    a digest of cnnlab's source: scripts/gpu_acceptance.sh refuses a stale bundle

    bash scripts/gpu_bundle.sh                 # -> .gpu_bundle/ (git-ignored; carried to the GPU machine)
    python scripts/gpu_bundle.py --plan        # list what would be carried, build nothing

On the GPU machine, scripts/gpu_acceptance.sh installs from the bundle alone and then runs
``python scripts/gpu_bundle.py --check``: every requirement in cnnlab's closure must be met by what is
installed there, or it names the ones that are not, in one line, before any GPU time is spent on training.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DEVICE_PACKAGES = Path(__file__).with_name("gpu_device_packages.txt")
# The GPU machine's interpreter and platform (device/KINDS.md): markers are judged as they will be there.
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64"]


def device_env(python: str) -> dict[str, str]:
    """The marker environment of a CPython ``python`` (3.12) on x86-64 Linux."""
    return {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
SOURCES = ("pyproject.toml", "cnnlab/**/*.py", "conf/**/*.yaml", "hydra_plugins/**/*.py")
FASHION_MNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def device_packages() -> set[str]:
    lines = DEVICE_PACKAGES.read_text().splitlines()
    return {canonicalize_name(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def project_requirements() -> list[Requirement]:
    """cnnlab's own runtime requirements, from pyproject.toml (no extras)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def applies(req: Requirement, env: dict[str, str]) -> bool:
    return req.marker is None or req.marker.evaluate({**env, "extra": ""})


def closure(roots: list[Requirement], env: dict[str, str], stop: set[str] = frozenset()) -> dict[str, list[Requirement]]:
    """Every distribution the ``roots`` need, directly or through another, under ``env``'s markers:
    name -> the requirements naming it. A name in ``stop`` is not followed further (it is there already,
    with whatever it needs). Distributions are read from what is installed in this interpreter."""
    needed: dict[str, list[Requirement]] = {}
    todo = [r for r in roots if applies(r, env)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        first = name not in needed
        needed.setdefault(name, []).append(req)
        if not first or name in stop:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # reported by unmet() or plan()
        todo += [r for r in map(Requirement, requires) if applies(r, env)]
    return needed


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan(python: str = DEVICE_PYTHON) -> list[tuple[str, str]]:
    """(name, version installed here) of each distribution to carry: cnnlab's closure, judged as on the GPU
    machine, less what that machine has. A needed distribution missing here too stops the build."""
    have = device_packages()
    carry, missing = [], []
    for name in sorted(set(closure(project_requirements(), device_env(python), stop=have)) - have):
        version = installed_version(name)
        (carry.append((name, version)) if version else missing.append(name))
    if missing:
        raise SystemExit(f"gpu_bundle: {', '.join(missing)} needed but not installed here; run scripts/setup.sh first")
    return carry


def unmet() -> list[str]:
    """On the GPU machine, after installing: each requirement of the installed cnnlab's closure that what is
    installed does not meet ("name (why)")."""
    cnnlab = metadata.distribution("cnnlab")
    env = default_environment()
    problems = []
    for name, reqs in sorted(closure([Requirement(r) for r in cnnlab.requires or []], env).items()):
        version = installed_version(name)
        if version is None:
            problems.append(f"{name} (not installed)")
            continue
        bad = [str(r.specifier) for r in reqs if not r.specifier.contains(Version(version), prereleases=True)]
        if bad:
            problems.append(f"{name} {version} (needs {', '.join(bad)})")
    return problems


def source_digest(root: Path = REPO) -> str:
    """SHA-256 over cnnlab's source files (paths and contents): the bundle's cnnlab wheel is of this source."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in SOURCES for p in root.glob(pattern) if "__pycache__" not in p.parts}):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
                          capture_output=True, text=True)


def fetch_wheel(name: str, version: str, wheels: Path, python: str) -> None:
    """A wheel of name==version for the GPU machine: the registry's cp312 manylinux or pure-Python wheel,
    or, for a distribution published only as source (antlr4-python3-runtime), one built here."""
    platforms = [arg for p in DEVICE_PLATFORMS for arg in ("--platform", p)]
    got = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation",
              "cp", *platforms, "-d", str(wheels), f"{name}=={version}")
    if got.returncode == 0:
        return
    built = pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), f"{name}=={version}")
    made = [w for w in wheels.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name]
    if built.returncode != 0 or not made:
        raise SystemExit(f"gpu_bundle: no wheel of {name}=={version} for Python {python}: "
                         f"{(got.stderr or built.stderr).strip().splitlines()[-1:]}")
    if not made[0].name.endswith("-py3-none-any.whl") and "-py2.py3-none-any" not in made[0].name:
        raise SystemExit(f"gpu_bundle: {made[0].name} was built for this machine, not for Python {python}")


def fashion_mnist_files(data_dir: str) -> dict[str, Path]:
    sys.path.insert(0, str(REPO))
    from cnnlab.data.datasets import find_mnist_files, mnist_candidates

    files = find_mnist_files(mnist_candidates("fashion_mnist", data_dir, "FashionMNIST"))
    if not files:
        raise SystemExit(f"gpu_bundle: Fashion-MNIST not found under {data_dir} nor in Debian's "
                         "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)")
    return files


def build(bundle: Path, data_dir: str, python: str) -> None:
    carry = plan(python)
    files = fashion_mnist_files(data_dir)
    staging = Path(tempfile.mkdtemp(prefix=".gpu_bundle-", dir=bundle.parent))
    try:
        wheels = staging / "wheels"
        wheels.mkdir()
        for name, version in carry:
            fetch_wheel(name, version, wheels, python)
            print(f"  {name}=={version}")
        made = pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO))
        if made.returncode != 0:
            raise SystemExit(f"gpu_bundle: cnnlab's wheel did not build: {made.stderr.strip()[-500:]}")
        raw = staging / "data" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for stem in FASHION_MNIST:
            shutil.copyfile(files[stem], raw / files[stem].name)
        (staging / "SOURCE").write_text(source_digest() + "\n")
        if bundle.exists():
            shutil.rmtree(bundle)
        staging.rename(bundle)  # a bundle is whole or absent
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"gpu_bundle: {bundle} ({len(list((bundle / 'wheels').glob('*.whl')))} wheels and Fashion-MNIST, "
          f"{size / 2**20:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", default=str(REPO / ".gpu_bundle"), help="the folder to write")
    parser.add_argument("--data-dir", default="data", help="where to look for Fashion-MNIST before Debian's folder")
    parser.add_argument("--python", default=DEVICE_PYTHON, help="the GPU machine's Python version (3.12)")
    parser.add_argument("--plan", action="store_true", help="print the distributions to carry, build nothing")
    parser.add_argument("--check", action="store_true", help="(GPU machine) is every requirement of the installed "
                                                             "cnnlab met? exit 1 naming those that are not")
    parser.add_argument("--digest", action="store_true", help="print the digest of this checkout's cnnlab source")
    args = parser.parse_args()
    if args.check:
        problems = unmet()
        if problems:
            print(f"gpu_bundle: cnnlab's requirements not met here: {'; '.join(problems)}", file=sys.stderr)
            raise SystemExit(1)
        return
    if args.digest:
        print(source_digest())
        return
    if args.plan:
        for name, version in plan(args.python):
            print(f"{name}=={version}")
        return
    if not re.fullmatch(r"[\w./-]+", args.bundle):
        raise SystemExit(f"gpu_bundle: {args.bundle!r}: use a plain folder name")
    build(Path(args.bundle).resolve(), args.data_dir, args.python)


if __name__ == "__main__":
    main()
