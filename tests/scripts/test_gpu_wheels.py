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
