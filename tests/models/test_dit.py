"""The DiT backbone: attention paths agree, both heads train, conditioning matters, FLOP count, presets."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.generator.dit import PRESETS, TIME_FREQUENCIES, Block, TrajectoryDiT, dit_config, math_attention
from specs import dit

SMALL = dict(token_dim=16, grid=4, width=32, depth=3, head_depth=2, heads=4, num_classes=5)
SHAPES = dict(token_dim=384, grid=8, num_classes=6, num_levels=4)   # what a preset leaves to the data


pytestmark = pytest.mark.usefixtures("single_thread")   # tests/models/conftest.py


def perturbed_model(seed: int = 0, dtype=torch.float64, **overrides) -> TrajectoryDiT:
    """A model moved off its adaLN-Zero start so every path carries signal."""
    torch.manual_seed(seed)
    model = TrajectoryDiT(dit(**{**SMALL, **overrides})).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def model_inputs(cfg, batch: int = 3, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = cfg.grid * cfg.grid
    return (torch.randn(batch, tokens, cfg.token_dim, generator=g, dtype=dtype),
            torch.rand(batch, generator=g, dtype=dtype),
            torch.randn(batch, tokens, cfg.token_dim, generator=g, dtype=dtype),
            torch.randint(0, cfg.num_classes + 1, (batch,), generator=g),
            torch.randint(0, cfg.num_levels, (batch,), generator=g))


def test_math_attention_equals_sdpa_and_restores_the_flag():
    model = perturbed_model()
    args = model_inputs(model.config)
    fused = model(*args)
    with math_attention(model):
        assert all(m.use_math_attention for m in model.modules() if hasattr(m, "use_math_attention"))
        explicit = model(*args)
    for a, b in zip(fused, explicit):
        assert a.abs().max() > 1e-3   # a non-trivial output
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError), math_attention(model):
        raise RuntimeError("the flag must be restored on errors too")
    assert not any(m.use_math_attention for m in model.modules() if hasattr(m, "use_math_attention"))


def test_forward_ad_through_math_attention_matches_finite_differences():
    model = perturbed_model(1)
    z, h, cond, label, level = model_inputs(model.config)
    direction = torch.randn_like(z)

    def x_head(z_):
        return model(z_, h, cond, label, level)[0]

    with math_attention(model), torch.no_grad():
        _, tangent = torch.func.jvp(x_head, (z,), (direction,))
        eps = 1e-6
        finite = (x_head(z + eps * direction) - x_head(z - eps * direction)) / (2 * eps)
    assert float((tangent - finite).norm() / finite.norm()) < 1e-7


def test_fresh_model_outputs_zero_and_is_adaln_zero():
    model = TrajectoryDiT(dit(**SMALL)).double()
    x_hat, v_hat = model(*model_inputs(model.config))
    assert float(x_hat.detach().abs().max()) == 0.0 and float(v_hat.detach().abs().max()) == 0.0
    # The blocks are identities at init: the trunk output equals the fused input plus positions.
    z, h, cond, label, level = model_inputs(model.config)
    tokens = model.fuse(torch.cat([z, cond], -1)) + model.position
    c = torch.randn(3, model.config.width, dtype=torch.float64)
    torch.testing.assert_close(model.trunk[0](tokens, c), tokens, atol=0, rtol=0)


def test_heads_differ_and_every_parameter_gets_gradient():
    model = perturbed_model()
    x_hat, v_hat = model(*model_inputs(model.config))
    assert x_hat.shape == v_hat.shape == (3, 16, 16)
    assert not torch.allclose(x_hat, v_hat)
    (x_hat.square().mean() + v_hat.square().mean()).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not float(p.grad.abs().sum()) > 0]
    assert silent == []
    # Trunk, then two separate heads: depth - head_depth shared blocks, head_depth per head.
    assert (len(model.trunk), len(model.x_blocks), len(model.v_blocks)) == (1, 2, 2)
    assert sum(isinstance(m, Block) for m in model.modules()) == 5


def test_every_conditioning_input_changes_the_output():
    model = perturbed_model(2)
    z, h, cond, label, level = model_inputs(model.config)
    base = model(z, h, cond, label, level)[0]
    for changed in ((z + 0.1, h, cond, label, level), (z, h + 0.3, cond, label, level),
                    (z, h, cond * 2, label, level), (z, h, cond, (label + 1) % 6, level),
                    (z, h, cond, label, (level + 1) % 4)):
        assert (model(*changed)[0] - base).abs().max() > 1e-4


def test_position_embedding_breaks_token_permutation_symmetry():
    model = perturbed_model(3)
    z, h, cond, label, level = model_inputs(model.config)
    order = torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(0))
    permuted_out = model(z[:, order], h, cond[:, order], label, level)[0]
    assert (permuted_out - model(z, h, cond, label, level)[0][:, order]).abs().max() > 1e-4


def test_flops_per_token_matches_torch_flop_counter():
    model = perturbed_model(dtype=torch.float32, mlp_ratio=3.0)
    cfg = model.config
    args = model_inputs(cfg, batch=2, dtype=torch.float32)
    with math_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    per_token = counter.get_total_flops() / (2 * cfg.grid * cfg.grid)
    assert abs(per_token - model.num_flops_per_token()) <= 0.5


def test_presets_shapes_and_validation():
    assert set(PRESETS) == {"tiny", "S", "B", "L", "H"}
    expected = {"tiny": (128, 4, 2, 4), "S": (384, 12, 4, 6), "B": (768, 16, 8, 12),
                "L": (1024, 32, 8, 16), "H": (1280, 48, 8, 16)}
    for name, sizes in expected.items():
        cfg = dit_config(name, **SHAPES)
        assert (cfg.width, cfg.depth, cfg.head_depth, cfg.heads) == sizes
    assert dit_config("B", **{**SHAPES, "grid": 16, "token_dim": 768}).grid == 16
    with pytest.raises(TypeError, match="num_levels"):   # the data's shapes are not the preset's to guess
        dit_config("tiny", token_dim=384, grid=8, num_classes=6)
    for name in ("tiny", "S"):
        model = TrajectoryDiT(dit_config(name, **SHAPES))
        x_hat, v_hat = model(*model_inputs(model.config, batch=1, dtype=torch.float32))
        assert x_hat.shape == v_hat.shape == (1, 64, 384)
    with pytest.raises(ValueError):
        dit_config("XL")
    with pytest.raises(ValueError):
        TrajectoryDiT(dit_config("tiny", **SHAPES, head_depth=5))
    with pytest.raises(ValueError):
        TrajectoryDiT(dit_config("tiny", **SHAPES, width=130))


def test_reference_presets_build_with_trunk_and_two_equal_heads_from_the_config():
    """B/L/H at ImageNet shape (16x16 tokens of 768-d), built on the meta device (no memory):
    depth - 8 shared blocks, then 8 blocks in each of the x and v heads; chosen by generator.preset."""
    from storage.config import TFConfig
    from tasks.plan import generator_config

    for preset, (width, depth) in {"B": (768, 16), "L": (1024, 32), "H": (1280, 48)}.items():
        cfg = generator_config(TFConfig(generator={"preset": preset}), grid=16, dim=768, num_classes=1000)
        assert (cfg.width, cfg.depth, cfg.head_depth, cfg.grid, cfg.token_dim) == (width, depth, 8, 16, 768)
        with torch.device("meta"):
            model = TrajectoryDiT(cfg)
        assert (len(model.trunk), len(model.x_blocks), len(model.v_blocks)) == (depth - 8, 8, 8)
        assert model.fuse.in_features == 2 * 768 and model.class_embed.num_embeddings == 1001   # + null label
        per_block = sum(p.numel() for p in model.trunk[0].parameters())
        assert per_block == 4 * width * width + 4 * width + 2 * 4 * width * width + 5 * width + 6 * width * (width + 1)
    overridden = generator_config(TFConfig(generator={"preset": "B", "depth": 10}), grid=8, dim=384, num_classes=6)
    assert (overridden.depth, overridden.head_depth, overridden.width) == (10, 8, 768)


def test_training_flops_are_forward_backward_and_the_tangent_the_flop_counter_sees():
    """training_flops_per_sample against torch's FlopCounterMode (math attention, float32): backward counts
    twice the forward; a forward-mode JVP through the network counts the forward once more plus attention's
    two products a second time per block (both heads here, so the x path's share follows by subtracting
    the v head's); and the h0 variant adds one forward of trunk and a head."""
    model = perturbed_model(dtype=torch.float32, mlp_ratio=3.0)
    cfg = model.config
    args = model_inputs(cfg, batch=2, dtype=torch.float32)
    tokens, per_sample = cfg.grid * cfg.grid, lambda flops: flops / 2
    with math_attention(model), FlopCounterMode(display=False) as counter:
        x_hat, x_v = model(*args)
        (x_hat.square().sum() + x_v.square().sum()).backward()
    forward = model.num_flops_per_token() * tokens
    # backward is twice the forward but for the input gradients of the two input layers (tokens, h), which
    # no parameter needs; MFU counts 3 F as is usual (and as bench/generators.py does)
    inputs = 2 * (2 * cfg.token_dim * cfg.width * tokens + TIME_FREQUENCIES * cfg.width)
    assert abs(per_sample(counter.get_total_flops()) - (3 * forward - inputs)) <= 3 * tokens
    # the product's tangent pass (models.generator.dit_jvp, as the training step runs it): its linears as the
    # counter sees them, plus attention's tangent products (an opaque kernel to the counter): 8 T^2 width each block
    from models.generator.dit_jvp import x_head_tangent

    z, h, cond, label, level = args
    with torch.no_grad():
        _, _, values = model(z, h, cond, label, level, keep_values=True)
        with FlopCounterMode(display=False) as counter:
            x_head_tangent(model, values, h, label, level, z, torch.ones_like(h))
    tangent = per_sample(counter.get_total_flops()) + 8 * tokens * tokens * cfg.width * cfg.depth
    same, h0 = model.training_flops_per_sample("same"), model.training_flops_per_sample("h0")
    x_path = h0 - same
    assert 0 < forward - x_path < x_path < forward   # the v head's own blocks and output layer
    assert same == 3 * forward + x_path + 4 * tokens * tokens * cfg.width * cfg.depth
    # within 5 %: the written-out tangent also differentiates the per-sample conditioning and skips the
    # condition's half of the input layer, which the count leaves as the forward has them (2.9 % at this
    # toy size, far less at a preset's, where the blocks dominate)
    assert abs((same - 3 * forward) - tangent) <= 0.05 * tangent


def test_x_prediction_is_forwards_x_head_exactly():
    """Sampling's x_prediction skips the v head and computes the same x_hat, bit for bit."""
    for dtype in (torch.float64, torch.float32):
        model = perturbed_model(dtype=dtype)
        args = model_inputs(model.config, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(model.x_prediction(*args), model(*args)[0])
