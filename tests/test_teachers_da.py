"""Depth Anything teachers: tiny randomly initialised models built with transformers' real classes,
saved to a directory and reloaded through the registry (no network)."""

import pytest
import torch

from core.spaces import DepthSpace
from distill.recipes import TeacherConfig
from distill.teachers import build_teacher, teacher_for
from distill.teachers.align import ScaleAligned, fit_scale
from distill.teachers.depth_anything import da3_metric_to_metres, network_focal, network_size
from distill.training.preflight import PreflightError, enforce, run_preflight


def tiny_da2(folder, kind: str, seed: int = 0):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type=kind,
                                 max_depth=10 if kind == "metric" else 1, patch_size=14)
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():   # a random head (its default init outputs a constant)
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("da2")
    return {kind: str(tiny_da2(root / kind, kind)) for kind in ("metric", "relative")}


def batch(b=2, h=64, w=80):
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(b, 1, h, w, generator=g) * 4 + 1
    return {"image": torch.randn(b, 3, h, w, generator=g), "depth": depth, "valid": depth > 0,
            "intrinsics": torch.tensor([[80.0, 80.0, 39.5, 31.5]] * b)}


def cfg(name, source, **kw):
    return TeacherConfig(name=name, source=source, input_size=28, **kw)


def test_reloaded_teachers_declare_units_and_output_them(checkpoints):
    metric = teacher_for(cfg("da2-metric", checkpoints["metric"]))
    relative = teacher_for(cfg("da2-relative", checkpoints["relative"]))
    assert (metric.space, relative.space) == (DepthSpace.METRIC, DepthSpace.DISPARITY)
    b = batch()
    m, r = metric(b), relative(b)
    assert m.shape == r.shape == (2, 1, 64, 80) and torch.isfinite(m).all() and torch.isfinite(r).all()
    assert 0 <= m.min() and m.max() <= 10 and m.std() > 0         # metres within max_depth
    assert r.min() >= 0 and metric.range.high == 10


def test_checkpoint_kind_and_missing_source_refused(checkpoints):
    with pytest.raises(ValueError, match="relative Depth Anything V2 checkpoint but teacher.name=da2-metric"):
        teacher_for(cfg("da2-metric", checkpoints["relative"]))
    with pytest.raises(ValueError, match="Depth-Anything-V2-Metric-Indoor-Large-hf"):
        teacher_for(cfg("da2-metric", ""))
    with pytest.raises(ValueError, match="metric Depth Anything V2 checkpoint but teacher.name=da2-relative"):
        teacher_for(cfg("da2-relative", checkpoints["metric"]))


def test_hub_id_offline_names_the_download(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # never touches the network
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download densekit-test/no-such-da2 --local-dir DIR") as err:
        teacher_for(cfg("da2-metric", "densekit-test/no-such-da2"))
    from core.cli import EXIT_USER, exit_code
    assert exit_code(err.value) == EXIT_USER   # the user's to fix: exit 2, the message without "failed:"


def test_preflight_refuses_the_relative_teacher_for_a_metric_recipe(checkpoints):
    for name, refused in (("da2-relative", True), ("da2-metric", False)):
        teacher = teacher_for(cfg(name, checkpoints[name.split("-")[1]]))
        b = batch()
        b["teacher_depth"] = teacher(b)
        report = run_preflight([b], [torch.ones_like(b["depth"])], target="teacher", target_space=teacher.space,
                               target_range=teacher.range, eval_space=DepthSpace.METRIC, teacher_name=teacher.name)
        if refused:
            with pytest.raises(PreflightError, match="training target space is disparity"):
                enforce(report, "strict")
        else:
            assert [c for c in report.checks if c.name == "units"][0].ok


def test_features_from_one_forward(checkpoints):
    teacher = teacher_for(cfg("da2-metric", checkpoints["metric"]))
    b = batch()
    depth, maps = teacher.depth_and_features(b)
    assert len(maps) == 4 and all(f.shape[0] == 2 and f.shape[1] == 16 for f in maps)
    sides = [f.shape[-1] for f in maps]
    assert sides == sorted(sides, reverse=True) and sides[0] > sides[-1]     # shallow/high-res first
    assert torch.equal(depth, teacher(b)) and all(torch.equal(a, c) for a, c in zip(maps, teacher.features(b)))
    assert network_size(64, 96, 28) == (28, 42)


def test_identity_follows_the_weights(checkpoints, tmp_path):
    a = teacher_for(cfg("da2-metric", checkpoints["metric"])).identity()
    other = teacher_for(cfg("da2-metric", str(tiny_da2(tmp_path / "other", "metric", seed=1)))).identity()
    assert a["weights"] != other["weights"] and a["space"] == "metric" and a["name"] == "da2-metric"
    assert a == teacher_for(cfg("da2-metric", checkpoints["metric"])).identity()


def test_da3_conversion_and_missing_package():
    out = torch.full((1, 1, 2, 2), 3.0)
    assert torch.allclose(da3_metric_to_metres(out, torch.tensor([500.0])), torch.full_like(out, 5.0))
    with pytest.raises(ValueError, match="intrinsics.json"):
        da3_metric_to_metres(out, torch.tensor([float("nan")]))
    # fx follows the width, fy the height: (200 * 2 + 100 * 0.5) / 2 at a (32, 160) network input
    k = torch.tensor([[200.0, 100.0, 40.0, 32.0]])
    assert torch.allclose(network_focal(k, (64, 80), (32, 160)), torch.tensor([225.0]))
    try:
        import depth_anything_3  # noqa: F401
        pytest.skip("depth_anything_3 is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="distill.cache_teacher da3-metric"):
        teacher_for(cfg("da3-metric", "depth-anything/DA3METRIC-LARGE"))


def test_fit_scale_recovers_a_known_factor_and_refuses_relative(checkpoints):
    class Shrunk(type(build_teacher("synthetic-metric"))):
        def __call__(self, b):
            return b["depth"] / 1.3
    batches = [batch(b=2) for _ in range(3)]
    assert abs(fit_scale(Shrunk(), batches) - 1.3) < 0.013
    aligned = ScaleAligned(Shrunk(), 1.3)
    assert torch.allclose(aligned(batches[0]), batches[0]["depth"], rtol=1e-5)
    assert aligned.identity()["scale"] == 1.3
    with pytest.raises(ValueError, match="scales metric depth"):
        ScaleAligned(teacher_for(cfg("da2-relative", checkpoints["relative"])), 2.0)
    empty = [dict(batch(), valid=torch.zeros(2, 1, 64, 80, dtype=torch.bool))]
    with pytest.raises(ValueError, match="unlabelled folder cannot be aligned"):
        fit_scale(Shrunk(), empty)


def test_align_fits_the_assistant_its_own_scale_on_the_same_images():
    """teacher.align=dataset: an assistant left in its own units would train the student on two
    scales, one step in three. Each teacher gets its factor from one draw of the loader."""
    from core.config import apply_overrides
    from distill.recipes import get_recipe
    from distill.training.distributed import Dist
    from distill.training.supervision import Supervision

    def scaled(factor):
        class Scaled(type(build_teacher("synthetic-metric"))):
            def __call__(self, b):
                return b["depth"] / factor
        return Scaled()

    recipe = apply_overrides(get_recipe("v3"), ["teacher.assistant=synthetic-assistant", "teacher.align=dataset"])
    supervision = Supervision(recipe, torch.device("cpu"))
    supervision.teacher, supervision.assistant = scaled(1.3), scaled(0.8)
    drawn = []

    def loader():
        for _ in range(50):
            drawn.append(1)
            yield batch(b=16)
    supervision.align(loader(), Dist(), log=lambda _: None)
    assert len(drawn) == 4   # 64 images, drawn once for both teachers
    assert abs(supervision.teacher.scale - 1.3) < 0.013 and abs(supervision.assistant.scale - 0.8) < 0.008
    b = batch()
    assert torch.allclose(supervision.assistant(b), b["depth"], rtol=1e-5)


def test_training_from_an_image_folder_with_the_real_teacher_class(checkpoints, tmp_path, monkeypatch):
    """Unlabelled images + a DA2 metric teacher, validated on SynthRooms."""
    import numpy as np
    from PIL import Image

    from distill.run import main

    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    assert main(["v3", f"data.dataset=folder:{tmp_path}", "data.val_dataset=synthrooms", "data.num_val=2",
                 "data.height=64", "data.width=64", "train.batch_size=4", "train.epochs=1",
                 "model.student=mobilenetv3_small_050", "model.decoder_channels=16", "eval.preview_images=1",
                 "teacher.name=da2-metric", f"teacher.source={checkpoints['metric']}", "teacher.input_size=28",
                 "distill.feature_weight=0.1", f"out_dir={tmp_path / 'runs'}", "--quiet"]) == 0


def test_a_source_that_is_no_checkpoint_is_refused_without_asking_the_hub(checkpoints, tmp_path, monkeypatch):
    """A mistyped path must not become a hub request (a download nobody asked for), and a folder
    that is not a checkpoint names what it lacks (exit 2, not transformers' OSError)."""
    from distill.teachers.depth_anything import not_a_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "empty").mkdir()
    for source in (str(tmp_path / "nope" / "da2"), "models/da2-metric", "./da2", "~/da2", "da2"):
        with pytest.raises(FileNotFoundError, match="is not a directory, and not a hub id"):
            teacher_for(cfg("da2-metric", source))
    with pytest.raises(FileNotFoundError, match="empty is a directory without config.json and weights"):
        teacher_for(cfg("da2-metric", "empty"))
    # weights without config.json: transformers built its default config (DA2-Small, relative) and
    # loaded a metric checkpoint as a relative model, or failed 70 lines later
    import shutil
    shutil.copytree(checkpoints["metric"], tmp_path / "no-config")
    (tmp_path / "no-config" / "config.json").unlink()
    for name in ("da2-metric", "da2-relative"):
        with pytest.raises(FileNotFoundError, match=f"no-config is a directory without config.json, so not a {name} "
                                                    f"checkpoint; it needs the files of `huggingface-cli download"):
            teacher_for(cfg(name, "no-config"))
    assert not_a_hub_id("depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf") == ""
    assert "./models is a directory here" in not_a_hub_id("models/da2-metric")
    # a hub snapshot's identity carries its commit: a cache resumed after the hub changed is refused
    teacher = teacher_for(cfg("da2-metric", checkpoints["metric"]))
    teacher.model.config._commit_hash = "0123abc"
    assert teacher.hub_revision() == f"hub:{checkpoints['metric']}@0123abc"
    # transformers 5 records no commit: it is read from the local hub cache's snapshot folder
    import huggingface_hub.constants
    repo = tmp_path / "hub" / "models--depth-anything--Depth-Anything-V2-Metric-Indoor-Small-hf"
    (repo / "snapshots" / "feedbeef").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("feedbeef")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    teacher.model.config._commit_hash = None
    teacher.source = "depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf"
    assert teacher.hub_revision() == "hub:depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf@feedbeef"
