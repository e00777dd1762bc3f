import math

import pytest
import torch

from distill.students import STUDENTS, build_student, count_macs, count_params


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "efficientvit_b0"])
def test_tiny_students_shapes(name):
    model = build_student(name, num_classes=13).eval()
    out = model(torch.randn(2, 3, 64, 96))
    assert out["depth"].shape == (2, 1, 64, 96) and out["seg"].shape == (2, 13, 64, 96)
    assert (out["depth"] > 0).all()


def test_registry_has_the_production_students():
    assert {"mobilenetv3_small_100", "mobilenetv3_large_100", "efficientvit_b1"} <= set(STUDENTS.names())


def test_input_not_multiple_of_32_is_refused():
    model = build_student("mobilenetv3_small_050")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        model(torch.randn(1, 3, 60, 96))


@pytest.mark.parametrize("activation", ["exp", "softplus"])
def test_depth_head_starts_at_the_median(activation):
    model = build_student("mobilenetv3_small_050", tasks=("depth",), depth_activation=activation).eval()
    head = model.heads["depth"]
    head.init_depth(3.2)
    with torch.no_grad():
        # a zero feature map isolates the bias: depth = activation(bias)
        out = head.up(head.out(torch.zeros(1, head.out.in_channels, 4, 4)))
        depth = torch.exp(out) if activation == "exp" else torch.nn.functional.softplus(out)
    assert torch.allclose(depth, torch.full_like(depth, 3.2), rtol=1e-5)
    assert set(model.heads) == {"depth"}


def test_log_depth_stays_float32_under_bf16_autocast():
    """CUDA's amp=auto trains under bf16 autocast: the depth head's output convolution and its
    upsampling of log-depth ran in bf16, a step of 0.4-1.6% of depth. They run in float32; the body
    before them stays in bf16. (CPU autocast here: the same dispatch.)"""
    head = build_student("mobilenetv3_small_050", decoder_channels=16).heads["depth"]
    seen = {}
    for name in ("body", "out", "up"):
        getattr(head, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    x = torch.rand(2, 16, 8, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        depth = head(x)
    assert seen == {"body": torch.bfloat16, "out": torch.float32, "up": torch.float32}
    assert depth.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(head(x), head.depth(head.body(x)))   # without autocast: one path
    student = build_student("mobilenetv3_small_050", decoder_channels=16, aux_heads=2).train()   # deep supervision
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(torch.rand(2, 3, 64, 96))
    assert out["depth"].dtype == torch.float32 and all(a["depth"].dtype == torch.float32 for a in out["aux"])


def test_params_and_macs_are_counted():
    """MACs, not FLOPs, of every layer: one 3x3 convolution by hand (8x8 outputs x 8 channels x 3 x 9),
    and the student's total as the sum over its convolutions (its only multiply-accumulate layers)."""
    from torch import nn

    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), 8, 8) == 8 * 8 * 8 * 3 * 9
    model = build_student("mobilenetv3_small_050").eval()
    summed = []
    hooks = [m.register_forward_hook(lambda m, i, out: summed.append(
        out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 96))
    for hook in hooks:
        hook.remove()
    macs = count_macs(model, 64, 96)
    assert macs == sum(summed) and count_params(model) > 1e5
    assert math.isclose(count_macs(model, 128, 192) / macs, 4.0, rel_tol=0.05)  # MACs scale with pixels


def test_local_pretrained_file_loads_and_missing_file_is_explained(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("mobilenetv3_small_050", pretrained=False)
    with torch.no_grad():
        src.conv_stem.weight.fill_(0.125)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = build_student("mobilenetv3_small_050", pretrained=str(tmp_path / "w.safetensors"))
    assert torch.all(model.encoder.conv_stem.weight == 0.125)
    with pytest.raises(FileNotFoundError, match="leave model.pretrained empty to train from scratch"):
        build_student("mobilenetv3_small_050", pretrained=str(tmp_path / "missing.safetensors"))
    # keys of another naming (a densekit student's "encoder.*"): timm loads non-strictly, so nothing loaded
    save_file({f"encoder.{k}": v for k, v in src.state_dict().items()}, str(tmp_path / "student.safetensors"))
    with pytest.raises(ValueError, match=r"student.safetensors left \d+ of the \d+ weight tensors of the "
                                         r"mobilenetv3_small_050 encoder as initialised \(first: conv_stem.weight\)"):
        build_student("mobilenetv3_small_050", pretrained=str(tmp_path / "student.safetensors"))
    other = timm.create_model("mobilenetv3_small_100", pretrained=False)   # another encoder's shapes
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors does not hold weights of the mobilenetv3_small_050 "
                                         r"encoder \(.*size mismatch"):
        build_student("mobilenetv3_small_050", pretrained=str(tmp_path / "other.safetensors"))


def test_separable_stride2_decoder_is_sharper_per_mac():
    """The stride-2 decoder level with depthwise-separable convolutions: full-size outputs from a
    decoder at half resolution, for about a third of the plain stride-4 decoder's MACs."""
    plain = build_student("mobilenetv3_small_100")
    sharp = build_student("mobilenetv3_small_100", output_stride=2, separable=True).eval()
    out = sharp(torch.randn(1, 3, 64, 96))
    assert out["depth"].shape == (1, 1, 64, 96) and out["seg"].shape == (1, 13, 64, 96)
    assert sharp.heads["depth"].up.scale_factor == 2 and plain.heads["depth"].up.scale_factor == 4
    assert sharp.decoder.out_channels == 32          # half width at stride 2
    assert count_macs(sharp, 128, 160) < 0.5 * count_macs(plain, 128, 160)
    # without `separable` only the stride-2 level and the heads are: still fewer MACs than stride 4
    assert count_macs(build_student("mobilenetv3_small_100", output_stride=2), 128, 160) < count_macs(plain, 128, 160)
    groups = [m.groups for m in sharp.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(groups) > 1                            # depthwise convolutions in the decoder


def test_the_stride2_level_convolves_pointwise_when_asked():
    """`fine_convs`: the stride-2 level's smoothing and the heads on it are depthwise-separable by
    default, or 1x1 only (no depthwise 3x3 at half resolution, where int8 gains nothing)."""
    def kernels(model):   # kernel sizes of the convolutions that run at stride 2
        parts = [model.decoder.smooth[0], *(head.body for head in model.heads.values())]
        return {m.kernel_size for part in parts for m in part.modules() if isinstance(m, torch.nn.Conv2d)}

    pointwise = build_student("mobilenetv3_small_050", output_stride=2, fine_convs="pointwise").eval()
    separable = build_student("mobilenetv3_small_050", output_stride=2).eval()
    assert kernels(pointwise) == {(1, 1)} and kernels(separable) == {(1, 1), (3, 3)}
    x = torch.randn(1, 3, 64, 96)
    assert pointwise(x)["seg"].shape == separable(x)["seg"].shape == (1, 13, 64, 96)
    assert count_macs(pointwise, 128, 160) < count_macs(separable, 128, 160)
    stride4 = build_student("mobilenetv3_small_050", output_stride=4)   # fine_convs leaves stride 4 alone
    assert {m.kernel_size for m in stride4.heads["seg"].body.modules() if isinstance(m, torch.nn.Conv2d)} == {(3, 3)}
    with pytest.raises(ValueError, match="fine_convs must be one of"):
        build_student("mobilenetv3_small_050", output_stride=2, fine_convs="full")


def test_an_encoder_without_a_stride2_level_takes_it_from_the_image():
    model = build_student("efficientvit_b0", output_stride=2).eval()   # EfficientViT starts at stride 4
    assert model.image_stem is not None and build_student("mobilenetv3_small_050", output_stride=2).image_stem is None
    out = model(torch.randn(1, 3, 64, 96))
    assert out["depth"].shape == (1, 1, 64, 96) and model.heads["seg"].up.scale_factor == 2
    with pytest.raises(ValueError, match="must be one of"):
        build_student("mobilenetv3_small_050", output_stride=8)


def test_the_normal_head_trains_and_never_ships():
    """`aux_normals`: training mode also predicts surface normals (3 channels at the output level's
    resolution); evaluation mode does not, and `shipped_state` leaves the head out."""
    from distill.students import shipped_state

    torch.manual_seed(0)
    model = build_student("mobilenetv3_small_050", aux_normals=True).train()
    assert model(torch.randn(2, 3, 64, 96))["normals"].shape == (2, 3, 16, 24)   # stride 4
    assert "normals" not in model.eval()(torch.randn(1, 3, 64, 96))
    plain = build_student("mobilenetv3_small_050").eval()
    assert set(model.state_dict()) - set(plain.state_dict()) == {"aux_normals.weight", "aux_normals.bias"}
    plain.load_state_dict(shipped_state(model.state_dict()))   # strict: nothing missing, nothing extra
    assert count_macs(model, 64, 96) == count_macs(plain, 64, 96)
    assert set(map(id, model.decoder_parameters())) >= set(map(id, model.aux_normals.parameters()))   # it trains


@pytest.mark.parametrize("name, options", [("mobilenetv3_small_050", {"aux_heads": 2, "aux_normals": True}),
                                           ("efficientvit_b0", {"output_stride": 2})])
def test_every_parameter_trains_in_exactly_one_group(name, options):
    """The optimizer's two groups (encoder, the rest) cover the whole student: EfficientViT's image
    stem at stride 2 was in neither until 2026-12-04, so it never trained."""
    model = build_student(name, **options)
    encoder, rest = map(lambda ps: {id(p) for p in ps}, (model.encoder_parameters(), model.decoder_parameters()))
    assert not encoder & rest and encoder | rest == {id(p) for p in model.parameters()}


def test_deep_supervision_heads_train_and_never_ship():
    """`aux_heads`: training mode also predicts both tasks from the decoder's coarsest outputs (at
    their own resolution); evaluation mode does not run them, and `shipped_state` leaves them out."""
    from distill.students import shipped_state

    torch.manual_seed(0)
    model = build_student("mobilenetv3_small_050", output_stride=2, aux_heads=2).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert [(a["depth"].shape, a["seg"].shape) for a in out["aux"]] == [
        ((2, 1, 4, 6), (2, 13, 4, 6)), ((2, 1, 8, 12), (2, 13, 8, 12))]   # stride 16, then 8
    assert all((a["depth"] > 0).all() for a in out["aux"])
    assert "aux" not in model.eval()(torch.randn(1, 3, 64, 96))
    plain = build_student("mobilenetv3_small_050", output_stride=2).eval()
    assert set(model.state_dict()) - set(plain.state_dict()) == {
        k for k in model.state_dict() if k.startswith("aux_heads.")} != set()
    plain.load_state_dict(shipped_state(model.state_dict()))   # strict: nothing missing, nothing extra
    x = torch.randn(1, 3, 64, 96)
    assert torch.equal(plain(x)["depth"], model(x)["depth"])
    assert count_macs(model, 64, 96) == count_macs(plain, 64, 96)   # what ships costs the same
    with pytest.raises(ValueError, match="aux_heads must be in"):
        build_student("mobilenetv3_small_050", output_stride=2, aux_heads=9)
