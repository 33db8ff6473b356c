"""Issue 17: what would fail after Prefect starts is refused before it, in one line on stderr, exit 2:
a root that cannot be written or is a file, a missing source, and encoder weights that are missing
(whatever encoder.allow_random_init says) or not a weights file. And the atomic writers' file mode."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storage.config import load_config, preflight
from storage.files import atomic_write_bytes, atomic_write_json
from storage.tables import atomic_write_parquet

REPO = Path(__file__).parents[2]
TF = REPO / ".venv" / "bin" / "tf"
TINY = REPO / "configs" / "tiny.yaml"
# Written to by nobody, root included: sysfs refuses new files (EACCES, or EROFS where it is mounted ro).
UNWRITABLE = Path("/sys")


def _tf(*args: str, limit: float = 5.0) -> tuple[int, list[str]]:
    """Run the console script; return (exit code, stderr lines), checking it answered within `limit` s."""
    start = time.monotonic()
    done = subprocess.run([str(TF), *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    elapsed = time.monotonic() - start
    assert elapsed < limit, f"took {elapsed:.1f}s: {done.stderr[-2000:]}"
    assert "Prefect" not in done.stderr and not done.stdout
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


def _refused(args: list[str], *expected: str, limit: float = 5.0) -> str:
    code, lines = _tf(*args, limit=limit)
    assert code == 2 and len(lines) == 1, lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _probe_fails(folder: Path) -> bool:
    try:
        (folder / f".tf-test-{os.getpid()}").touch()
    except OSError:
        return True
    (folder / f".tf-test-{os.getpid()}").unlink()
    return False


@pytest.mark.skipif(not _probe_fails(UNWRITABLE), reason="/sys is writable here")
@pytest.mark.parametrize("command", ["pipeline", "ingest", "serve"])
def test_unwritable_root_is_one_line_at_once(command):
    line = _refused([command, "--root", str(UNWRITABLE)], f"tf {command}: root {UNWRITABLE}: not writable")
    assert line.startswith(f"tf {command}: ")
    # A root still to be made, under a folder nobody may write: named, and nothing is made.
    _refused([command, "--root", str(UNWRITABLE / "tf-root" / "deeper")],
             f"root {UNWRITABLE / 'tf-root' / 'deeper'}: cannot be created: {UNWRITABLE} is not writable")


def test_root_that_is_a_file_is_one_line_at_once(tmp_path):
    afile = tmp_path / "root.txt"
    afile.write_text("not a folder")
    _refused(["encode", "--root", str(afile)], f"tf encode: root {afile}: exists and is not a directory")
    _refused(["ingest", "--root", str(afile / "inside")], f"root {afile / 'inside'}: cannot be created",
             f"{afile} is not a directory")
    assert afile.read_text() == "not a folder"


def test_a_good_root_is_probed_without_leaving_anything(tmp_path):
    from flows.checks import root_problem

    assert root_problem(tmp_path) is None
    assert root_problem(tmp_path / "new" / "root") is None
    assert list(tmp_path.iterdir()) == []    # the probe file is gone, the root is not made


@pytest.mark.parametrize("command", ["ingest", "pipeline"])
def test_missing_source_path_is_named(tmp_path, command):
    missing = tmp_path / "imagenet" / "train"
    root = tmp_path / "root"
    _refused([command, "--config", str(REPO / "configs" / "imagenet.yaml"), "--root", str(root),
              "--set", f"source.path={missing}", "--set", "encoder.allow_random_init=true",
              "--set", "encoder.weights=null"],
             f"tf {command}: invalid config: source.path {missing} does not exist")
    assert not root.exists()


def test_source_path_of_the_wrong_kind_and_missing_label_files(tmp_path):
    afile = tmp_path / "train.tar"
    afile.write_bytes(b"")
    with pytest.raises(ValueError, match="source.path .* is not a folder"):
        preflight(load_config(TINY, ["source.kind=imagefolder", f"source.path={afile}"]), "ingest")
    with pytest.raises(ValueError, match="source.path .* is not a file"):
        preflight(load_config(TINY, ["source.kind=imagenet_tar", f"source.path={tmp_path}"]), "ingest")
    with pytest.raises(ValueError, match=f"source.labels_file {tmp_path / 'labels.txt'} does not exist"):
        preflight(load_config(TINY, ["source.kind=imagenet_val", f"source.path={tmp_path}",
                                     f"source.labels_file={tmp_path / 'labels.txt'}"]), "ingest")
    preflight(load_config(TINY, ["source.kind=imagefolder", f"source.path={tmp_path}"]), "ingest")
    # Stages that do not read the source do not need it here.
    preflight(load_config(TINY, ["source.kind=imagefolder", f"source.path={tmp_path / 'gone'}"]), "train")


@pytest.mark.parametrize("allow", ["true", "false"])
def test_a_weights_typo_is_refused_even_when_random_init_is_allowed(tmp_path, allow):
    typo = tmp_path / "dinov2_vits14_reg4.safetensor"
    root = tmp_path / "root"
    line = _refused(["encode", "--config", str(TINY), "--root", str(root), "--set", f"encoder.weights={typo}",
                     "--set", f"encoder.allow_random_init={allow}"],
                    f"tf encode: invalid config: encoder.weights {typo} does not exist")
    if allow == "true":
        assert "only stands in for an unset encoder.weights" in line
    assert not root.exists()


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors", "garbage.bin"])
def test_garbage_weights_name_the_file_and_never_advise_weights_only_false(tmp_path, name):
    weights = tmp_path / name
    weights.write_bytes(os.urandom(4096))
    # A torch checkpoint is looked into with torch (imported on demand: slower on a 2-core box).
    limit = 5.0 if name.endswith(".safetensors") else 30.0
    line = _refused(["pipeline", "--config", str(TINY), "--root", str(tmp_path / "root"),
                     "--set", f"encoder.weights={weights}"],
                    f"encoder.weights {weights}: cannot be read as a weights file: ", limit=limit)
    assert "weights_only" not in line


def test_weights_files_of_the_supported_formats_pass(tmp_path):
    """Readable files pass preflight, whatever model they are for (that is build_encoder's check),
    including a timm-style checkpoint dict and a file only partly there is refused."""
    import torch
    from safetensors.torch import save_file

    state = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8)}
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save(state, str(tmp_path / "pretrain.pth"))
    torch.save({"model": state, "epoch": 3}, str(tmp_path / "checkpoint.pth"))
    for name in ("model.safetensors", "pretrain.pth", "checkpoint.pth"):
        preflight(load_config(TINY, [f"encoder.weights={tmp_path / name}"]), "encode")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-16])
    with pytest.raises(ValueError, match="cut.safetensors: cannot be read as a weights file: truncated"):
        preflight(load_config(TINY, [f"encoder.weights={tmp_path / 'cut.safetensors'}"]), "encode")
    torch.save({"model": "not tensors"}, str(tmp_path / "nothing.pth"))
    with pytest.raises(ValueError, match="holds no tensors"):
        preflight(load_config(TINY, [f"encoder.weights={tmp_path / 'nothing.pth'}"]), "evaluate")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask, mode):
    import torch

    from storage.checkpoints import save_checkpoint

    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "marker", b"x")
        atomic_write_json(tmp_path / "chunk.json", {"done": True})
        atomic_write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "table.parquet")
        save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(3)}, {})   # safetensors writes a file of its own
    finally:
        os.umask(previous)
    for name in ("marker", "chunk.json", "table.parquet", "ckpt.safetensors", "ckpt.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk.json", "ckpt.json", "ckpt.safetensors", "marker",
                                                          "table.parquet"]


def test_config_path_is_relative_to_the_repository_whatever_the_working_directory(tmp_path, monkeypatch):
    from flows.checks import checked_config
    from storage.config import TFConfig

    monkeypatch.chdir(tmp_path)
    assert checked_config("ingest", tmp_path / "root", TFConfig(), "configs/tiny.yaml") == load_config(TINY)
    with pytest.raises(ValueError, match="config_path configs/none.yaml: .*No such file"):
        checked_config("ingest", tmp_path / "root", TFConfig(), "configs/none.yaml")


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file holding float32 tensors of `shapes`, all zero: its data is a hole (no disk used)."""
    import json
    import struct

    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)


def test_weights_of_another_model_are_refused_before_any_stage_in_one_line(tmp_path):
    """Issue 31: a DINOv2-B/14 file configured for the S/14 encoder was noticed 15 s into the flow under a
    long traceback; the checks before any stage now name the file and the first mismatched tensors."""
    import timm
    import torch

    with torch.device("meta"):
        base = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0)
    weights = tmp_path / "dinov2_vitb14_reg4.safetensors"
    _sparse_safetensors(weights, {k: tuple(v.shape) for k, v in base.state_dict().items()})
    root = tmp_path / "root"
    for command in ("encode", "pipeline"):
        _refused([command, "--config", str(TINY), "--root", str(root), "--set", f"encoder.weights={weights}"],
                 f"tf {command}: invalid config: encoder.weights {weights} does not fit encoder.model "
                 f"vit_small_patch14_reg4_dinov2: shape in file vs model (174): cls_token [1, 1, 768] vs [1, 1, 384]")
    assert not root.exists()
    # by construction, not by the clock: the check reads the header and compares shapes without torch or timm
    probe = (f"import sys\nfrom flows.checks import checked_config\nfrom storage.config import load_config\n"
             f"cfg = load_config({str(TINY)!r}, ['encoder.weights={weights}'])\n"
             f"try:\n    checked_config('encode', {str(root)!r}, cfg)\nexcept ValueError as error:\n"
             f"    print('refused', 'torch' in sys.modules, 'timm' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["refused", "False", "False"], done.stderr[-2000:]
