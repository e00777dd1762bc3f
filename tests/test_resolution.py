"""Progressive resizing (`train.half_res_epochs`): the halved, padded batch and the loss on it."""
import pytest
import torch

from distill.data.classes import IGNORE_INDEX
from distill.recipes import get_recipe
from distill.training.objective import Objective
from distill.training.resolution import half_resolution


def batch(height: int = 64, width: int = 80) -> dict:
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 1, height, width, generator=g) * 4 + 0.5
    return {"image": torch.randn(2, 3, height, width, generator=g), "depth": depth,
            "valid": torch.rand(2, 1, height, width, generator=g) > 0.1, "teacher_depth": depth * 1.05,
            "seg": torch.randint(0, 13, (2, height, width), generator=g),
            "intrinsics": torch.tensor([[60.0, 60.0, width / 2, height / 2]] * 2), "index": torch.tensor([3, 4])}


def test_half_resolution_averages_the_image_samples_the_labels_and_pads_to_the_multiple():
    b = batch()   # 64x80 -> 32x40 -> padded to 32x64: 12 columns on each side
    out = half_resolution(b, 32)
    assert out["image"].shape == (2, 3, 32, 64) and out["seg"].shape == (2, 32, 64)
    inner = (slice(None), slice(None), slice(None), slice(12, 52))
    # a 2x2 block's mean, and the border repeated into the padding
    assert torch.allclose(out["image"][inner], torch.nn.functional.avg_pool2d(b["image"], 2), atol=1e-6)
    assert torch.equal(out["image"][..., :12], out["image"][..., 12:13].expand(-1, -1, -1, 12))
    # labels sampled from the block (never averaged across an edge), unknown in the padding
    assert torch.equal(out["depth"][inner], b["depth"][..., 1::2, 1::2])
    assert torch.equal(out["seg"][:, :, 12:52], b["seg"][:, 1::2, 1::2])
    assert not out["valid"][..., :12].any() and not out["valid"][..., 52:].any()
    assert (out["teacher_depth"][..., :12] == 0).all() and (out["seg"][:, :, 52:] == IGNORE_INDEX).all()
    assert out["valid"].dtype == torch.bool and out["seg"].dtype == b["seg"].dtype
    # the camera follows: half the focal length, the principal point halved then shifted by the padding
    assert out["intrinsics"][0].tolist() == [30.0, 30.0, 20.0 + 12, 16.0]
    assert torch.equal(out["index"], b["index"])


def test_a_batch_already_at_the_multiple_is_not_padded():
    out = half_resolution(batch(128, 192), 32)
    assert out["image"].shape[-2:] == (64, 96) and bool(out["valid"].float().mean() > 0.8)


def test_no_loss_reads_a_padded_pixel():
    """Whatever the student predicts in the padding, the step's losses are the same."""
    recipe = get_recipe("v3")
    objective = Objective(recipe)
    b = half_resolution(batch(), 32)
    g = torch.Generator().manual_seed(1)
    def prediction(h: int, w: int) -> dict:
        return {"depth": torch.rand(2, 1, h, w, generator=g) + 1, "seg": torch.randn(2, 13, h, w, generator=g)}

    # deep supervision's outputs at stride 16 and 8 (v3 trains with them): their first column
    # covers 16 and 8 pixels of which 12 and 8 are padding
    out = {**prediction(32, 64), "aux": [prediction(2, 4), prediction(4, 8)]}
    other = {**{k: out[k].clone() for k in ("depth", "seg")}, "aux": [{k: v.clone() for k, v in a.items()}
                                                                      for a in out["aux"]]}
    other["depth"][..., :12] = 50.0
    other["seg"][..., 52:] = -30.0
    for level in other["aux"]:
        level["depth"][..., 0] = 50.0
        level["seg"][..., 0] = 30.0
    first, second = objective(out, b), objective(other, b)
    assert first.keys() == {"depth", "seg"}
    for task in first:
        assert torch.allclose(first[task], second[task]), task


def test_odd_sides_are_refused():
    with pytest.raises(ValueError, match="even image sides"):
        half_resolution(batch(63, 80), 32)
