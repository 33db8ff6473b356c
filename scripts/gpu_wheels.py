"""Wheels for a GPU machine without a package index: download here, install there.

    python scripts/gpu_wheels.py [--python 3.12] [--dest .whl]      # here (needs PyPI)
    bash scripts/gpu_install.sh                                      # there (python -m pip, no index)

The lent GPU machines run Python 3.12 with torch, torchvision and timm preinstalled and no package
index. This resolves pyproject's runtime dependencies for that Python and platform with pip's own
resolver (newest versions the ranges allow), leaves out what the machine provides (torch and
torchvision always: its CUDA build must stay; the big scientific wheels it already has unless
--with-present), downloads the rest into --dest, and writes --dest/requirements.txt pinning them (and
--dest/no-deps.txt: the torch-side packages, installed there without their dependencies). The dashboard's streamlit is left out unless --with-dashboard.
The project itself is installed there with --no-deps, so pyproject's torch pin (the CPU machines')
never asks for another torch. Everything downloaded must fit the 64 MiB the device tool carries.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Never downloaded: the GPU machine's own CUDA build must stay.
PROVIDED = {"torch", "torchvision", "triton"}
# Depend on torch: downloaded without their dependencies (the rest of what they need is resolved below).
WITHOUT_DEPS = {"torch-fidelity", "timm"}
# On the GPU image already and large (tens of MB each): kept as they are there unless --with-present.
PRESENT_LARGE = {"numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "pillow"}
# The dashboard's own (streamlit pulls pydeck and altair, 24 MB): a GPU machine runs stages, not the viewer.
DASHBOARD = {"streamlit"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64", "any")


# pip before 24.2 checks Requires-Python against the interpreter it runs in, not --python-version: on
# Python 3.11 it resolved zarr 3.1.6 for 3.12, where 3.4.2 (Requires-Python >= 3.12) is the newest allowed.
MIN_PIP = (24, 2)


def pip_too_old(version: str) -> str | None:
    """Why pip `version` cannot resolve for another Python, or None when it can."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers >= MIN_PIP:
        return None
    return (f"pip {version} resolves Requires-Python against this interpreter, not --python-version (it picks "
            f"older wheels, zarr 3.1.6 instead of 3.4.2): run this with pip >= {'.'.join(map(str, MIN_PIP))}, "
            f"e.g. `make setup && .venv/bin/python scripts/gpu_wheels.py`")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0])


def runtime_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def wheel_pin(filename: str) -> str:
    """`name==version` of a wheel file (PEP 427: {name}-{version}-...whl)."""
    name, version = filename.split("-")[:2]
    return f"{canonical(name)}=={version}"


def target_flags(python: str) -> list[str]:
    flags = ["--python-version", python, "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}",
             "--only-binary=:all:"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def resolve(requirements: list[str], python: str) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install for `requirements` on the target Python."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "--target", str(Path(tmp) / "t"), *target_flags(python),
                        *requirements], check=True)
        install = json.loads(report.read_text())["install"]
    return [(canonical(item["metadata"]["name"]), item["metadata"]["version"]) for item in install]


def plan(resolved: list[tuple[str, str]], with_present: bool) -> list[str]:
    """The pins to download: the resolution minus what the GPU machine keeps of its own."""
    keep_theirs = PROVIDED | (set() if with_present else PRESENT_LARGE)
    pins = [f"{name}=={version}" for name, version in resolved if name not in keep_theirs
            and not name.startswith(("nvidia-", "cuda-"))]
    return sorted(pins)


def download(pins: list[str], dest: Path, python: str, no_deps: bool = True) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest),
                    *(["--no-deps"] if no_deps else []), *target_flags(python), *pins], check=True)


# nvImageCodec's wheel carries every Python's extension module and codecs the pass never uses (25 MB):
# slimmed to the target Python's module, the library and its JPEG extensions (5 MB) so it fits the carry.
def nvimgcodec_drop(python: str) -> re.Pattern:
    """The members of nvImageCodec's wheel that Python `python` (major.minor) on the GPU machine never loads."""
    return re.compile(rf"(nvimgcodec_impl\.cpython-(?!{python.replace('.', '')}-)[^/]*\.so$|"
                      r"extensions/lib(opencv|nvtiff|tiff|nvjpeg2k|nvbmp|nvpnm)_ext|/include/|/tools/)")


def slim_wheel(source: Path, dest: Path, drop: re.Pattern) -> Path:
    """A copy of wheel `source` in folder `dest` without the members `drop` matches, its RECORD rewritten
    (each kept file's sha256 and size) so that pip installs it as any wheel."""
    out = dest / source.name
    with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(out.with_suffix(".tmp"), "w", zipfile.ZIP_DEFLATED) as slim:
        record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in wheel.infolist():
            if info.filename == record or drop.search(info.filename):
                continue
            data = wheel.read(info)
            slim.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        slim.writestr(record, "\n".join([*rows, f"{record},,"]) + "\n")
    out.with_suffix(".tmp").rename(out)
    return out


# Prefect's web UI, two builds (4.9 MB of its 7 MB wheel): a GPU machine runs stages against the ephemeral API,
# whose server never serves the UI (Prefect starts it with PREFECT_UI_ENABLED=0), and the carry is 64 MiB.
PREFECT_UI = re.compile(r"^prefect/server/ui(-v2)?/")


def slim_prefect(dest: Path) -> list[Path]:
    """Prefect's wheels in `dest` without the web UI, in place (a wheel already slimmed stays as it is)."""
    slimmed = []
    for wheel in dest.glob("prefect-*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            has_ui = any(PREFECT_UI.search(name) for name in archive.namelist())
        if has_ui:
            slimmed.append(slim_wheel(wheel, dest, PREFECT_UI))
    return slimmed


def drop_extra(dest: Path, pattern: str) -> None:
    """What dest/extra holds of `pattern` removed (it holds what this run asked for, nothing older)."""
    for old in (dest / "extra").glob(pattern):
        old.unlink()


def nvimgcodec_extra(dest: Path, python: str, cuda: str) -> Path:
    """nvImageCodec for encoder.gpu_decoder=nvimgcodec, slimmed into dest/extra (gpu_install.sh installs it)."""
    extra = dest / "extra"
    extra.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download([f"nvidia-nvimgcodec-cu{cuda}"], Path(tmp), python)
        [wheel] = Path(tmp).glob("*.whl")
        drop_extra(dest, "nvidia_nvimgcodec*.whl")
        return slim_wheel(wheel, extra, nvimgcodec_drop(python))


def profiler_extra(dest: Path, python: str) -> Path:
    """py-spy (a sampling profiler, one static binary) into dest/extra, for bench/encode_profile.py there."""
    extra = dest / "extra"
    extra.mkdir(parents=True, exist_ok=True)
    drop_extra(dest, "py_spy*.whl")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(extra),
                    "--only-binary=:all:", "--python-version", python, "--implementation", "py", "--abi", "none",
                    *(flag for platform in ("manylinux_2_5_x86_64", "manylinux1_x86_64")
                      for flag in ("--platform", platform)), "py-spy"], check=True)
    [wheel] = extra.glob("py_spy*.whl")
    return wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--dest", default=str(REPO / ".whl"), help="folder for the wheels (git-ignored)")
    parser.add_argument("--with-present", action="store_true",
                        help="also download the large scientific wheels the GPU image already has")
    parser.add_argument("--with-dashboard", action="store_true", help="also the dashboard's streamlit")
    parser.add_argument("--nvimgcodec-cuda", default="13",
                        help="CUDA major of the GPU machine's torch, for nvImageCodec's wheel ('' leaves it out)")
    parser.add_argument("--profiler", action="store_true",
                        help="also py-spy (2.8 MiB; with nvImageCodec too it is over the budget: pass "
                             "--nvimgcodec-cuda '' with it)")
    parser.add_argument("--budget-mib", type=float, default=58.0,
                        help="fail if the wheels exceed this (the device tool carries 64 MiB with the repo)")
    args = parser.parse_args()

    from importlib.metadata import version
    if reason := pip_too_old(version("pip")):
        sys.exit(reason)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = runtime_requirements()
    torch_side = [r for r in wanted if requirement_name(r) in WITHOUT_DEPS]
    left_out = PROVIDED | WITHOUT_DEPS | (set() if args.with_dashboard else DASHBOARD)
    rest = [r for r in wanted if requirement_name(r) not in left_out]
    resolved = resolve(rest, args.python)
    resolved += resolve([*torch_side, "--no-deps"], args.python) if torch_side else []
    pins = plan(resolved, args.with_present)
    for wheel in dest.glob("*.whl"):   # a pin that moved leaves no second version behind
        if wheel_pin(wheel.name) not in pins:
            wheel.unlink()
    download(pins, dest, args.python)
    slim_prefect(dest)
    torch_pins = [p for p in pins if p.split("==")[0] in WITHOUT_DEPS]
    (dest / "requirements.txt").write_text("".join(f"{p}\n" for p in pins if p not in torch_pins))
    (dest / "no-deps.txt").write_text("".join(f"{p}\n" for p in torch_pins))
    if args.nvimgcodec_cuda:
        nvimgcodec_extra(dest, args.python, args.nvimgcodec_cuda)
    else:   # what extra/ holds is what was asked for this time
        drop_extra(dest, "nvidia_nvimgcodec*.whl")
    if args.profiler:
        profiler_extra(dest, args.python)
    else:
        drop_extra(dest, "py_spy*.whl")
    size = sum(p.stat().st_size for p in dest.rglob("*.whl")) / 2**20
    print(f"{len(pins)} wheels for Python {args.python} in {dest} ({size:.1f} MiB); "
          f"left to the GPU machine: {', '.join(sorted(PROVIDED | (set() if args.with_present else PRESENT_LARGE)))}")
    if size > args.budget_mib:
        sys.exit(f"{size:.1f} MiB of wheels is over --budget-mib {args.budget_mib}: the device tool would refuse them")


if __name__ == "__main__":
    main()
