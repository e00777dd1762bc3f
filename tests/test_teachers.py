import pytest
import torch

from core.spaces import DepthSpace
from distill.teachers import TEACHERS, TeacherErrorModel, build_teacher


def room_batch(b=2, h=32, w=48):
    depth = torch.linspace(1.0, 9.0, w).expand(b, 1, h, w).clone()
    depth[:, :, :, :4] = 0  # an invalid strip
    return {"depth": depth, "valid": depth > 0, "index": torch.arange(b)}


def test_teachers_declare_their_spaces():
    assert build_teacher("synthetic-metric").space is DepthSpace.METRIC
    assert build_teacher("synthetic-relative").space is DepthSpace.RELATIVE
    with pytest.raises(KeyError, match='Did you mean "synthetic-metric"'):
        TEACHERS.get("synthetic-metrc")


def test_each_space_names_what_its_depth_holds():   # the phrase artefacts describe their depth output with
    assert DepthSpace.METRIC.phrase() == "metric depth in metres"
    assert DepthSpace.RELATIVE.phrase() == "relative depth (affine-invariant, unitless)"
    assert DepthSpace.DISPARITY.phrase() == "disparity depth (inverse depth up to scale)"


def test_metric_teacher_error_model_is_mild_deterministic_and_masked():
    batch = room_batch()
    teacher = build_teacher("synthetic-metric")
    a, b = teacher(batch), teacher(batch)
    assert torch.equal(a, b)                                       # same image -> same pseudo-label
    assert torch.all(a[~batch["valid"]] == 0)
    ratio = a[batch["valid"]] / batch["depth"][batch["valid"]]
    assert 0.85 < ratio.min() and ratio.max() < 1.15               # a few percent, metres kept
    assert not torch.allclose(a[batch["valid"]], batch["depth"][batch["valid"]])
    assert not torch.allclose(a[0], a[1])                          # per-image scale and noise differ


def test_a_flipped_sample_gets_the_mirror_of_its_label_as_from_a_cache():
    batch = room_batch(b=1)
    depth = batch["depth"] * torch.linspace(1.0, 1.3, 32).view(1, 1, -1, 1)   # not symmetric along either axis
    mirrored = {"depth": depth.flip(-1), "valid": depth.flip(-1) > 0, "index": batch["index"],
                "flipped": torch.tensor([True])}
    for name in ("synthetic-metric", "synthetic-assistant"):
        teacher = build_teacher(name)
        label = teacher({"depth": depth, "valid": depth > 0, "index": batch["index"]})
        assert torch.allclose(teacher(mirrored), label.flip(-1), rtol=1e-5, atol=1e-6), name


def test_embedded_teachers_label_a_batch_where_it_lies():
    """On CUDA the loader's `flipped` tensor is on the GPU while the noise was drawn on the CPU: every
    CUDA run with an embedded teacher stopped at its first label. The `meta` device stands in for a
    GPU here (CI has none); the indices stay on the CPU, as `int()` of a meta tensor has no value."""
    batch = room_batch()
    batch = {"depth": batch["depth"].to("meta"), "valid": batch["valid"].to("meta"), "index": batch["index"],
             "flipped": torch.tensor([True, False], device="meta")}
    for name in ("synthetic-metric", "synthetic-assistant", "synthetic-relative"):
        label = build_teacher(name)(batch)
        assert label.device.type == "meta" and label.shape == (2, 1, 32, 48), name


def test_far_compression_shrinks_far_depth():
    errors = TeacherErrorModel(blur_sigma=1e-3, scale_sigma=0.0, noise_sigma=0.0)
    batch = room_batch(b=1)
    out = build_teacher("synthetic-metric", errors=errors)(batch)
    far = batch["depth"] > 8.5
    assert torch.allclose(out[far], batch["depth"][far] * (1 - 0.05 * (batch["depth"][far] / 10) ** 2), rtol=1e-3)


def test_relative_teacher_is_normalised_inverse_depth():
    batch = room_batch()
    rel = build_teacher("synthetic-relative")(batch)
    v = batch["valid"]
    assert rel[v].min() == 0 and torch.isclose(rel[v].max(), torch.tensor(1.0))
    assert rel[0, 0, 0, 4] == 1.0 and rel[0, 0, 0, -1] == 0.0     # near = 1, far = 0
