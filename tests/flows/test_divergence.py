"""No silent divergence (issue 30), tried as a new user would: `tf pipeline` on configs/tiny.yaml with a
learning rate that makes training diverge fails at the training stage, names the stage, the update and the
value, leaves the runs table a failed row that says so, and marks nothing complete. Divergence is NaN or
infinite values, or a gradient that vanished above a non-zero loss (the output saturated): which of the two
a learning rate of 1e6 gives the decoder depends on rounding and on the packages installed (NaN when the
issue was filed and in this suite until 2026-12-06; in a fresh environment that day, weights of 7e5 and
every gradient exactly zero from update 4 on)."""
import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from models.nonfinite import NonFiniteTraining
from storage.checkpoints import NonFiniteWeights, load_checkpoint, save_checkpoint
from storage.config import load_config
from storage.keys import Layout
from storage.tables import load_runs

CONFIG = "configs/tiny.yaml"


@pytest.mark.parametrize(("override", "stage", "row"), [
    ("generator.lr=10", "train-L0", "train"),
    ("decoder.lr=1e6", "train-decoder", "train"),
])
def test_a_learning_rate_that_diverges_fails_the_training_stage_naming_nan(tmp_path, copy_root, override, stage, row):
    root = copy_root(tmp_path / "root", upstream_only=True)   # ingest .. judge reused: only training runs
    with pytest.raises(NonFiniteTraining, match=rf"stage {stage} diverged: (non-finite (loss|gradient norm)|the "
                                                rf"gradient vanished) at update \d+: loss \S+, gradient norm \S+[; ]"
                       ) as raised:
        main(["pipeline", "--config", CONFIG, "--root", str(root), "--set", override, "--run-id", "diverged"])
    message = str(raised.value)
    assert ("nan" in message or "gradient norm 0.0" in message) and "nothing was marked complete" in message
    runs = load_runs(root)
    failed = runs[(runs.status == "failed") & (runs.kind == "stage")]
    assert list(failed.stage) == [row] and f"stage {stage} diverged: " in failed.error.iloc[0]
    if stage == "train-L0":   # the decoder, trained before it in the same call, keeps its row
        assert list(runs[(runs.kind == "stage") & (runs.stage == "train-decoder")].status) in (["computed"], ["reused"])
    whole = runs[runs.kind == "run"]   # the run's own row fails with it
    assert list(whole.status) == ["failed"] and f"stage {stage} diverged" in whole.error.iloc[0]
    layout = Layout(root, load_config(CONFIG, [override]))
    folder = layout.decoder() if stage == "train-decoder" else layout.generator(0)
    assert not (folder / "_COMPLETE").exists()
    for weights in folder.glob("*.safetensors"):   # any snapshot kept is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values()), weights


def test_non_finite_weights_are_never_written_or_loaded_and_the_error_names_the_file(tmp_path):
    from safetensors.torch import save_file

    from storage.files import atomic_write_json

    with pytest.raises(NonFiniteWeights, match=r"generator.safetensors holds 1 NaN or infinite values"):
        save_checkpoint(tmp_path / "generator", {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor([3])}, {})
    assert not (tmp_path / "generator.safetensors").exists()
    # one written before the check existed (or by hand): evaluation's load refuses it
    save_file({"w": torch.tensor([float("inf"), 1.0, float("nan")])}, str(tmp_path / "old.safetensors"))
    atomic_write_json(tmp_path / "old.json", {"stage": "generator"})
    with pytest.raises(NonFiniteWeights, match=rf"{tmp_path / 'old.safetensors'} holds 2 NaN or infinite values"):
        load_checkpoint(tmp_path / "old")
