"""generator.optimizer: muon equals optax.contrib.muon(learning_rate=0.01, adam_b2=0.95) with optax's
defaults (the reference's optimiser), step after step, on the generator's own parameters.

The reference is written out here in float64 NumPy from optax's formulas, on the parameters laid out
as the reference's Flax model holds them: a Dense kernel is [fan_in, fan_out] (torch's weight
transposed), q, k and v are three kernels (our fused qkv), an embedding table is [1, N, D]; and split
as optax splits them by default, "muon" where ndim == 2, "adam" for the rest."""
import numpy as np
import pytest
import torch

from models.generator.dit import TrajectoryDiT
from models.generator.optim import build_optimizers
from specs import dit, optim

pytestmark = pytest.mark.usefixtures("single_thread")   # tests/models/conftest.py

LR, BETA, B1, B2, EPS = 0.01, 0.95, 0.9, 0.95, 1e-8
NS = (3.4445, -4.7750, 2.0315)
FUSED = {"qkv": 3}   # our linears that are several of the reference's kernels


def flax_leaves(model: torch.nn.Module, grads: bool = False) -> dict[tuple[str, int], np.ndarray]:
    """The reference's leaves for our parameters (or their gradients): {(torch name, block): array in
    the Flax layout}."""
    leaves = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        value = (p.grad if grads else p).detach().numpy().copy()
        owner = modules[name.rsplit(".", 1)[0]]
        if isinstance(owner, torch.nn.Linear) and name.endswith(".weight"):
            blocks = FUSED.get(name.rsplit(".", 2)[-2], 1)
            for b, rows in enumerate(np.split(value, blocks, axis=0)):
                leaves[(name, b)] = rows.T.copy()
        elif isinstance(owner, torch.nn.Embedding):
            leaves[(name, 0)] = value[None].copy()
        else:
            leaves[(name, 0)] = value
    return leaves


def torch_layout(model: torch.nn.Module, leaves: dict, name: str) -> np.ndarray:
    """A parameter back in torch's layout from the reference's leaves."""
    parts = [leaves[key] for key in sorted(k for k in leaves if k[0] == name)]
    owner = dict(model.named_modules())[name.rsplit(".", 1)[0]]
    if isinstance(owner, torch.nn.Linear) and name.endswith(".weight"):
        return np.concatenate([kernel.T for kernel in parts], axis=0)
    if isinstance(owner, torch.nn.Embedding):
        return parts[0][0]
    return parts[0]


def orthogonalize(x: np.ndarray) -> np.ndarray:
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + EPS)
    for _ in range(5):
        a = x @ x.T
        b = NS[1] * a + NS[2] * a @ a
        x = NS[0] * x + b @ x
    return x.T if transposed else x


class OptaxMuon:
    """optax.contrib.muon(0.01, adam_b2=0.95): partition by ndim; scale_by_muon (Nesterov) -> add 0 x
    weights -> -lr; adamw(b1 0.9, b2 0.95, eps 1e-8, eps_root 0, weight_decay 0, nesterov) for the rest."""

    def __init__(self, leaves: dict):
        self.mu = {k: np.zeros_like(v) for k, v in leaves.items()}
        self.nu = {k: np.zeros_like(v) for k, v in leaves.items()}
        self.count = {"muon": 0, "adam": 0}

    def step(self, params: dict, grads: dict) -> None:
        for label in ("muon", "adam"):
            self.count[label] += 1
        for key, g in grads.items():
            label = "muon" if params[key].ndim == 2 else "adam"
            t = self.count[label]
            b1 = BETA if label == "muon" else B1
            self.mu[key] = (1 - b1) * g + b1 * self.mu[key]
            m_hat = b1 * self.mu[key] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
            if label == "muon":
                update = orthogonalize(m_hat)
                update = np.sqrt(max(1, update.shape[-1] / update.shape[-2])) * update
            else:
                self.nu[key] = (1 - B2) * g ** 2 + B2 * self.nu[key]
                nu_hat = self.nu[key] / (1 - B2 ** t)
                update = m_hat / (np.sqrt(nu_hat + 0.0) + EPS)
            params[key] = params[key] - LR * update


def test_one_update_after_another_equals_optax_muon_on_the_generators_parameters():
    torch.manual_seed(0)
    # fuse [2 x 8 -> 24] is wider than tall, the outputs [24 -> 8] taller: both orientations and a
    # fan_out / fan_in scale of sqrt(3) on fuse and sqrt(4) on the first MLP linears
    model = TrajectoryDiT(dit(token_dim=8, grid=4, width=24, depth=2, head_depth=1, heads=2, num_classes=3)).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():   # zero-initialised layers made non-trivial, so no update is trivially equal
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    optimizers, schedules = build_optimizers(model, optim(optimizer="muon", lr=LR, warmup_steps=0, weight_decay=0.0))
    reference_params = flax_leaves(model)
    labels = {k: ("muon" if v.ndim == 2 else "adam") for k, v in reference_params.items()}
    assert {n for (n, _), lab in labels.items() if lab == "muon"} >= {"fuse.weight", "trunk.0.attn.qkv.weight",
                                                                     "x_final.linear.weight", "h_embed.0.weight"}
    assert labels[("class_embed.weight", 0)] == labels[("fuse.bias", 0)] == "adam"
    reference = OptaxMuon(reference_params)
    for step in range(4):
        for p in model.parameters():   # the same gradients to both, scales unlike each other
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) * (1 + step)
        grads = flax_leaves(model, grads=True)
        for optimizer, schedule in zip(optimizers, schedules):
            optimizer.step()
            schedule.step()
        reference.step(reference_params, grads)
        for name, p in model.named_parameters():
            want = torch_layout(model, reference_params, name)
            np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-9, atol=1e-12, err_msg=f"{name} step {step}")
    assert optimizers[0].param_groups[0]["lr"] == LR   # constant, no warm-up


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 needs CUDA (runs on the GPU machine)")
def test_newton_schulz_runs_in_tf32_on_cuda_and_leaves_the_setting_as_it_was():
    from models.generator.optim import newton_schulz, tf32_matmuls

    x = torch.randn(4, 256, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    before = torch.backends.cuda.matmul.allow_tf32
    exact = newton_schulz(x.double()).float()
    with tf32_matmuls(x.device):
        assert torch.backends.cuda.matmul.allow_tf32
        fast = newton_schulz(x)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    # TF32 rounds the inputs to 10 mantissa bits: close to the float64 iteration, not equal to it
    assert (fast - exact).abs().max() < 2e-2 * exact.abs().max()
