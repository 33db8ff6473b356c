"""storage/checkpoints.py: building a module straight from a checkpoint (no random initialisation, no copy)."""
import pytest
import torch
from torch import nn

from models.decoder import DecoderSpec, TokenDecoder
from models.generator.dit import TrajectoryDiT, dit_config
from storage.checkpoints import built_with, load_built, save_module


def _generator() -> TrajectoryDiT:
    return TrajectoryDiT(dit_config("S", token_dim=8, grid=4, num_classes=3, num_levels=3, depth=2, head_depth=1))


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 16, 8, generator=g)
    h = torch.rand(batch, generator=g)
    cond = torch.randn(batch, 16, 8, generator=g)   # the level before's canvas
    return z, h, cond, torch.tensor([0, 2][:batch]), torch.tensor([1, 2][:batch])


def test_a_generator_built_from_its_checkpoint_equals_one_loaded_the_ordinary_way(tmp_path):
    torch.manual_seed(1)
    trained = _generator().eval()
    save_module(tmp_path / "generator", trained, {"note": "test"})
    rng = torch.random.get_rng_state()
    built, meta = load_built(tmp_path / "generator", lambda meta: _generator())
    assert torch.equal(torch.random.get_rng_state(), rng), "building drew random numbers"
    assert meta == {"note": "test"}
    ordinary = _generator()
    ordinary.load_state_dict(trained.state_dict())
    for name, value in ordinary.state_dict().items():
        assert torch.equal(built.state_dict()[name], value), name
    assert torch.equal(built.position, trained.position)   # the non-persistent table, not left empty
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in built.parameters())
    with torch.no_grad():
        for a, b in zip(built.eval()(*_inputs()), trained(*_inputs())):
            assert torch.equal(a, b)


def test_the_decoder_keeps_its_position_table_too(tmp_path):
    spec = DecoderSpec(token_dim=8, grid=4, patch=2, width=16, depth=1, heads=2)
    trained = TokenDecoder(spec)
    built = built_with(lambda: TokenDecoder(spec), dict(trained.state_dict()))
    assert torch.equal(built.pos_embed, trained.pos_embed)
    tokens = torch.randn(2, 16, 8)
    assert torch.equal(built(tokens), trained(tokens))


class _TableOnTheDefaultDevice(nn.Module):
    """A non-persistent buffer made on the default device: on meta it would hold nothing."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("table", torch.arange(3.0), persistent=False)

    def forward(self, x):
        return self.linear(x) + self.table


def test_a_module_whose_own_buffer_would_be_empty_is_built_the_ordinary_way():
    trained = _TableOnTheDefaultDevice()
    built = built_with(_TableOnTheDefaultDevice, dict(trained.state_dict()))
    assert not any(t.is_meta for t in built.state_dict().values())
    assert torch.equal(built.table, torch.arange(3.0))
    x = torch.randn(4, 3)
    assert torch.equal(built(x), trained(x))


def test_a_checkpoint_missing_a_weight_is_refused():
    tensors = dict(_generator().state_dict())
    tensors.pop(next(iter(tensors)))
    with pytest.raises(RuntimeError, match="Missing key"):
        built_with(_generator, tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_a_generator_built_on_the_gpu_from_its_checkpoint_holds_the_file_s_values(tmp_path):
    trained = _generator().eval()
    save_module(tmp_path / "generator", trained, {})
    built, _ = load_built(tmp_path / "generator", lambda meta: _generator(), "cuda")
    assert all(t.is_cuda for t in [*built.parameters(), *built.buffers()])
    for name, value in trained.state_dict().items():
        assert torch.equal(built.state_dict()[name].cpu(), value), name
    assert torch.equal(built.position.cpu(), trained.position)
