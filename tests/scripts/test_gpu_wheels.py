"""scripts/gpu_wheels.py without a package index: what it pins from a resolution, how it names wheels."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_wheels.py"
spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def test_runtime_requirements_come_from_pyproject_and_torch_is_never_pinned_for_the_gpu():
    names = {gpu_wheels.requirement_name(r) for r in gpu_wheels.runtime_requirements()}
    assert {"torch", "torchvision", "prefect", "zarr", "dask", "torch-fidelity"} <= names
    resolved = [("torch", "2.14.1"), ("nvidia-cudnn-cu13", "9.1"), ("zarr", "3.4.2"), ("numpy", "2.5.5"),
                ("prefect", "3.9.1"), ("triton", "3.6.0"), ("cuda-bindings", "13.0"), ("pandas", "3.1.1")]
    assert gpu_wheels.plan(resolved, with_present=False) == ["prefect==3.9.1", "zarr==3.4.2"]
    assert gpu_wheels.plan(resolved, with_present=True) == ["numpy==2.5.5", "pandas==3.1.1", "prefect==3.9.1",
                                                           "zarr==3.4.2"]


def test_names_are_canonical_as_pip_compares_them():
    assert gpu_wheels.requirement_name("dask[distributed]>=2024.8") == "dask"
    assert gpu_wheels.requirement_name("Torch_Fidelity >= 0.3") == "torch-fidelity"
    assert gpu_wheels.wheel_pin("google_crc32c-1.9.0-cp312-cp312-manylinux2014_x86_64.whl") == "google-crc32c==1.9.0"
    assert gpu_wheels.wheel_pin("PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl") == "pyyaml==6.0.4"
    flags = gpu_wheels.target_flags("3.12")
    assert flags[flags.index("--abi") + 1] == "cp312" and "--only-binary=:all:" in flags


def test_a_slimmed_wheel_keeps_only_what_it_should_and_pip_installs_it(tmp_path):
    """nvImageCodec's wheel slimmed for the carry: other Pythons' modules and unused codecs gone, RECORD
    rewritten with each kept file's hash, and pip (offline) installs the result."""
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src" / "demo_pkg-1.0-py3-none-any.whl"
    source.parent.mkdir()
    members = {"demo/__init__.py": b"VALUE = 1\n", "demo/nvimgcodec_impl.cpython-312-x86_64-linux-gnu.so": b"keep",
               "demo/nvimgcodec_impl.cpython-313-x86_64-linux-gnu.so": b"drop",
               "demo/extensions/libopencv_ext.so.0": b"drop", "demo/extensions/libnvjpeg_ext.so.0": b"keep",
               "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
               "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               b"Tag: py3-none-any\n",
               "demo_pkg-1.0.dist-info/RECORD": b"stale,,\n"}
    with zipfile.ZipFile(source, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    drop = gpu_wheels.nvimgcodec_drop("3.12")
    slim = gpu_wheels.slim_wheel(source, tmp_path, drop)
    with zipfile.ZipFile(slim) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("demo_pkg-1.0.dist-info/RECORD").decode()
    assert names == {n for n, data in members.items() if data != b"drop"}
    assert "stale" not in record and record.count("sha256=") == len(names) - 1
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(tmp_path / "site"), str(slim)], check=True)
    assert (tmp_path / "site" / "demo" / "extensions" / "libnvjpeg_ext.so.0").read_bytes() == b"keep"
    assert not (tmp_path / "site" / "demo" / "extensions" / "libopencv_ext.so.0").exists()


def test_extra_holds_only_what_was_asked_this_time(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    for name in ("nvidia_nvimgcodec_cu13-0.9-py3-none-any.whl", "py_spy-0.4.3-py2.py3-none-any.whl"):
        (extra / name).write_bytes(b"x")
    gpu_wheels.drop_extra(tmp_path, "py_spy*.whl")
    assert [p.name for p in extra.iterdir()] == ["nvidia_nvimgcodec_cu13-0.9-py3-none-any.whl"]


def test_prefects_wheel_loses_only_its_web_ui_and_a_second_slimming_leaves_it_alone(tmp_path):
    import zipfile

    members = {"prefect/__init__.py": b"", "prefect/server/ui/index.html": b"ui",
               "prefect/server/ui-v2/assets/app.js": b"ui", "prefect/server/ui_build.py": b"keep",
               "prefect/server/api/ui/flows.py": b"keep", "prefect-3.9.1.dist-info/RECORD": b"stale,,\n"}
    wheel = tmp_path / "prefect-3.9.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert gpu_wheels.slim_prefect(tmp_path) == [wheel]
    with zipfile.ZipFile(wheel) as archive:
        assert set(archive.namelist()) == {n for n, data in members.items() if data != b"ui"}
    assert gpu_wheels.slim_prefect(tmp_path) == []


def test_a_pip_that_resolves_for_its_own_python_is_refused_by_name():
    """pip 24.1 resolved zarr 3.1.6 for Python 3.12 from a 3.11 interpreter; 24.2 resolves 3.4.2 (both run here)."""
    assert "24.1" in gpu_wheels.pip_too_old("24.1") and "24.2" in gpu_wheels.pip_too_old("23.2.1")
    assert gpu_wheels.pip_too_old("24.2") is None and gpu_wheels.pip_too_old("26.3") is None
