"""models.encoder_layout writes out the DINOv2 encoders' state-dict shapes without torch or timm, for the
checks that run before any stage. Held equal to timm's own (a meta-device model) for every supported
name, and its comparison accepts what timm's loader accepts (Meta's key names, resampled position
embeddings and patch kernels) and refuses what it refuses."""
import pytest
import timm
import torch

from models.encoder_layout import ENCODERS, expected_shapes, misfit


def _timm_shapes(name: str, img_size: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, weight_init="skip")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(ENCODERS.values()))
@pytest.mark.parametrize("img_size", [56, 224])
def test_written_out_shapes_are_timms(name, img_size):
    assert expected_shapes(name, img_size) == _timm_shapes(name, img_size)


def test_meta_key_names_and_resampled_tensors_fit():
    expected = expected_shapes("vit_giant_patch14_reg4_dinov2", 224)
    meta = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in expected.items()
            if k != "reg_token"}
    meta.update({"register_tokens": (1, 4, 1536), "mask_token": (1, 1536),   # Meta's own names and extras
                 "pos_embed": (1, 1 + 37 * 37, 1536)})                         # the 518 px grid with a class slot
    assert misfit(expected, meta) is None
    small = expected_shapes("vit_small_patch14_dinov2", 56)
    assert misfit(small, {**small, "patch_embed.proj.weight": (384, 3, 16, 16)}) is None   # kernel resampled


def test_another_width_or_depth_is_named():
    small = expected_shapes("vit_small_patch14_reg4_dinov2", 56)
    base = expected_shapes("vit_base_patch14_reg4_dinov2", 56)
    assert misfit(small, base).startswith("shape in file vs model (174): cls_token [1, 1, 768] vs [1, 1, 384]")
    large = expected_shapes("vit_large_patch14_reg4_dinov2", 56)
    reason = misfit(base, {k: v for k, v in large.items() if "blocks.0." not in k})
    assert reason.startswith("missing (14): blocks.0.norm1.weight") and "unexpected (" in reason
    assert misfit(small, {**small, "head.weight": (1000, 384)}) == "unexpected (1): head.weight"
