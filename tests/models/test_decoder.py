import numpy as np
import pytest
import torch
from torch import nn

from models.decoder import (
    DecoderSpec,
    TokenDecoder,
    decoder_loss,
    images_to_tensor,
    tensor_to_images,
    unpatchify,
)


@pytest.mark.parametrize("grid", [8, 16])
def test_output_shape_and_range(grid):
    torch.manual_seed(0)
    config = DecoderSpec(token_dim=24, grid=grid, patch=14, width=32, depth=1, heads=2)
    decoder = TokenDecoder(config)
    with torch.no_grad():
        decoder.head.weight.normal_(std=5.0)  # push logits far so the range check bites
        out = decoder(torch.randn(2, grid * grid, 24))
    assert out.shape == (2, 3, grid * 14, grid * 14)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.min() < 0.01 and out.max() > 0.99


def test_wrong_token_count_rejected():
    decoder = TokenDecoder(DecoderSpec(token_dim=8, grid=4, patch=2, width=16, depth=1, heads=2))
    with pytest.raises(ValueError):
        decoder(torch.randn(1, 15, 8))


class ConstantHead(nn.Module):
    """Stands in for the final linear: token k writes logit(value[k, c]) into all its pixels of channel c."""

    def __init__(self, values: torch.Tensor, patch: int):
        super().__init__()
        logits = torch.logit(values)  # [T, 3]
        self.register_buffer("patches", logits[:, None, :].expand(-1, patch * patch, 3).reshape(1, -1, patch * patch * 3))

    def forward(self, x):
        return self.patches.expand(x.shape[0], -1, -1)


def test_unpatchify_places_each_token_in_its_block():
    grid, patch = 3, 14
    decoder = TokenDecoder(DecoderSpec(token_dim=8, grid=grid, patch=patch, width=16, depth=1, heads=2))
    tokens = grid * grid
    values = (torch.arange(tokens * 3, dtype=torch.float32).reshape(tokens, 3) + 1) / (tokens * 3 + 2)
    decoder.head = ConstantHead(values, patch)
    with torch.no_grad():
        out = decoder(torch.randn(2, tokens, 8))
    for i in range(grid):
        for j in range(grid):
            block = out[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
            want = values[i * grid + j][None, :, None, None].expand_as(block)
            torch.testing.assert_close(block, want, rtol=0, atol=1e-6)


def test_unpatchify_within_patch_layout_matches_numpy():
    grid, patch = 2, 3
    patches = torch.arange(2 * grid * grid * patch * patch * 3, dtype=torch.float32).reshape(2, grid * grid, -1)
    got = unpatchify(patches, grid, patch).numpy()
    src = patches.numpy()
    want = np.zeros((2, 3, grid * patch, grid * patch), dtype=np.float32)
    for b in range(2):
        for k in range(grid * grid):
            i, j = divmod(k, grid)
            for py in range(patch):
                for px in range(patch):
                    for c in range(3):
                        want[b, c, i * patch + py, j * patch + px] = src[b, k, (py * patch + px) * 3 + c]
    np.testing.assert_array_equal(got, want)


def test_decoder_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pred_np = rng.uniform(size=(2, 3, 5, 5)).astype(np.float32)
    target_np = rng.uniform(size=(2, 3, 5, 5)).astype(np.float32)
    loss, parts = decoder_loss(torch.from_numpy(pred_np), torch.from_numpy(target_np))
    l1 = np.abs(pred_np - target_np).mean()
    l2 = ((pred_np - target_np) ** 2).mean()
    assert loss.item() == pytest.approx(l1 + l2, rel=1e-5)
    assert parts["l1"] == pytest.approx(l1, rel=1e-5) and parts["l2"] == pytest.approx(l2, rel=1e-5)
    assert parts["loss"] == pytest.approx(l1 + l2, rel=1e-5)


def test_uint8_round_trip_exact():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 7, 5, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 128]
    x = images_to_tensor(images)
    assert x.shape == (3, 3, 7, 5) and x.dtype == torch.float32
    assert x[0, 1, 0, 0].item() == pytest.approx(1.0) and x[0, 2, 0, 0].item() == pytest.approx(128 / 255)
    back = tensor_to_images(x)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, images)
    # out-of-range values are clamped, not wrapped
    clipped = tensor_to_images(torch.tensor([-0.5, 1.5, 0.5]).reshape(1, 3, 1, 1))
    assert clipped.reshape(-1).tolist() == [0, 255, 128]


def test_tiny_decoder_overfits_eight_images():
    torch.manual_seed(0)
    config = DecoderSpec(token_dim=16, grid=4, patch=4, width=64, depth=2, heads=4)
    decoder = TokenDecoder(config)
    tokens = torch.randn(8, 16, 16)
    # smooth-ish targets: random colour per 2x2 token block, plus a gradient
    coarse = torch.rand(8, 3, 2, 2)
    ramp = torch.linspace(0, 1, 16)[None, None, None, :]
    targets = (0.7 * nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
               + 0.3 * ramp).clamp(0, 1)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss, _ = decoder_loss(decoder(tokens), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5
