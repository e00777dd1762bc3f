import numpy as np
import pytest
import torch
from torch import nn

from distill.students import build_student, count_macs
from quant.prune import PruneTarget, check_budget, prune_student, smallest_macs, stage_targets

SIZE = (64, 96)
FORMS = r'"macs=0\.5x"'   # every parse error lists the accepted forms


def tiny(name: str = "mobilenetv3_small_050") -> nn.Module:
    torch.manual_seed(0)
    return build_student(name, decoder_channels=16, num_classes=13)


def conv_out_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def assert_output_shapes(model: nn.Module) -> None:
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, *SIZE))
    assert out["depth"].shape == (1, 1, *SIZE) and out["seg"].shape == (1, 13, *SIZE)


class Outputs(nn.Module):
    """The export wrapper: a tuple instead of a dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out["depth"], out["seg"]


@pytest.fixture(scope="module")
def pruned():
    model = tiny().train()
    before = conv_out_channels(model)
    report = prune_student(model, PruneTarget(ratio=0.3), SIZE, log=lambda _: None)
    return model, before, report


def test_ratio_pruning_shrinks_encoder_and_decoder_and_keeps_outputs(pruned):
    model, before, report = pruned
    assert model.training, "the caller's train/eval mode is restored"
    assert report["macs_after"] < report["macs_before"] and report["params_after"] < report["params_before"]
    assert report["macs_after"] == count_macs(model, *SIZE) and report["ratio"] == 0.3
    assert report["ignored"] == ["heads.depth.out", "heads.seg.out"]
    assert (model.heads["depth"].out.weight.shape[0], model.heads["seg"].out.weight.shape[0]) == (1, 13)
    after = conv_out_channels(model)
    changed = [name for name in before if after[name] != before[name]]
    assert any(n.startswith("encoder.") for n in changed) and any(n.startswith("decoder.") for n in changed)
    # Exactly: every Conv2d whose out_channels changed (pointwise, depthwise and SE convs alike) now
    # has a multiple of round_to=8 of them; the protected head outputs are not among the changed.
    assert all(after[n] % 8 == 0 for n in changed), {n: after[n] for n in changed if after[n] % 8}
    assert not {"heads.depth.out", "heads.seg.out"} & set(changed)
    assert_output_shapes(model)


@pytest.mark.parametrize("fraction, importance", [(0.75, "magnitude"), (0.5, "magnitude"), (0.5, "bn_scale")])
def test_mac_fraction_target_lands_within_ten_percent_below_the_budget(fraction, importance):
    model, lines = tiny(), []
    report = prune_student(model, PruneTarget(macs=fraction), SIZE, importance=importance, log=lines.append)
    # One uniform ratio lands wherever the rounding of every group falls at once (v3: 0.56x, then
    # 0.39x); the greedy steps of one group each stop within one step of the budget.
    assert 0.9 * fraction <= report["macs_after"] / report["macs_before"] <= fraction, report
    assert report["macs_after"] == count_macs(model, *SIZE) and 0 < report["ratio"] < 1
    assert report["importance"] == importance
    assert lines[0].startswith("prune step ") and lines[-2].endswith(f"(budget {fraction * report['macs_before'] / 1e6:.2f}M)")
    before, after = conv_out_channels(tiny()), conv_out_channels(model)
    assert all(after[n] % 8 == 0 for n in after if after[n] != before[n]), after   # whole round_to blocks
    assert_output_shapes(model)


def test_unknown_importance_names_the_choices():
    with pytest.raises(ValueError, match='unknown pruning importance "random": use one of magnitude, bn_scale, taylor'):
        prune_student(tiny(), PruneTarget(ratio=0.3), SIZE, importance="random", log=lambda _: None)


def test_taylor_importance_ranks_by_weight_times_gradient():
    with pytest.raises(ValueError, match="has no gradients"):
        prune_student(tiny(), PruneTarget(macs=0.5), SIZE, importance="taylor", log=lambda _: None)
    model = tiny()
    out = model.eval()(torch.rand(2, 3, *SIZE))
    (out["depth"].mean() + out["seg"].logsumexp(1).mean()).backward()
    report = prune_student(model, PruneTarget(macs=0.5), SIZE, importance="taylor", log=lambda _: None)
    assert 0.45 <= report["macs_after"] / report["macs_before"] <= 0.5 and report["importance"] == "taylor"
    assert_output_shapes(model)
    # The gradients decide: the same budget by weight magnitude keeps other channels.
    magnitude = tiny()
    prune_student(magnitude, PruneTarget(macs=0.5), SIZE, importance="magnitude", log=lambda _: None)
    kept = {n: p.detach() for n, p in model.named_parameters()}
    assert any(p.shape != kept[n].shape or not torch.equal(p.detach(), kept[n])
               for n, p in magnitude.named_parameters())
    # NaN gradients (a NaN label reached the loss) would rank channels at random: refused by name
    poisoned = tiny()
    out = poisoned.eval()(torch.rand(2, 3, *SIZE))
    (out["depth"].mean() * float("nan")).backward()
    with pytest.raises(ValueError, match="non-finite channel importance .* NaN or inf"):
        prune_student(poisoned, PruneTarget(macs=0.5), SIZE, importance="taylor", log=lambda _: None)


def test_the_ratio_path_ranks_as_the_mac_path_and_a_failure_leaves_the_model_whole():
    # NaN gradients: refused by name, and no group was pruned before the bad one was reached
    poisoned = tiny()
    out = poisoned.eval()(torch.rand(2, 3, *SIZE))
    (out["depth"].mean() * float("nan")).backward()
    before = conv_out_channels(poisoned)
    with pytest.raises(ValueError, match="non-finite channel importance .* NaN or inf"):
        prune_student(poisoned, PruneTarget(ratio=0.5), SIZE, importance="taylor", log=lambda _: None)
    assert conv_out_channels(poisoned) == before
    # bn_scale scores a group without BatchNorm None; torch-pruning alone would skip it, the MAC
    # path ranks it by magnitude, and so does the ratio path now
    model = tiny()
    prune_student(model, PruneTarget(ratio=0.5), SIZE, importance="bn_scale", round_to=4, log=lambda _: None)
    after = conv_out_channels(model)
    without_bn = [n for n in before if n.endswith("se.conv_reduce")]
    assert without_bn and any(after[n] < before[n] for n in without_bn), {n: (before[n], after[n]) for n in without_bn}
    assert_output_shapes(model)


def test_efficientvit_prunes_around_the_linear_attention_and_runs():
    model = tiny("efficientvit_b0")
    before = conv_out_channels(model)
    report = prune_student(model, PruneTarget(ratio=0.3), SIZE, log=lambda _: None)
    assert report["macs_after"] < report["macs_before"]
    attention = [n for n in report["ignored"] if n.endswith((".qkv", ".aggreg"))]
    assert attention, report["ignored"]
    after = conv_out_channels(model)
    # LiteMLA's head layout is untouched; the residual stream around it (proj's outputs) is pruned.
    assert all(after[n] == before[n] for n in after if n.startswith(tuple(attention)))
    assert any(after[n] < before[n] for n in after if n.endswith("context_module.main.proj.conv"))
    assert_output_shapes(model)


def test_pruned_model_exports_and_onnxruntime_matches_torch(pruned, tmp_path):
    import onnxruntime as ort   # a dependency of the export extra: a skip would hide a broken install
    wrapper = Outputs(pruned[0]).eval()
    x = torch.rand(1, 3, *SIZE)
    path = str(tmp_path / "pruned.onnx")
    torch.onnx.export(wrapper, (x,), path, opset_version=18, dynamo=True)   # as targets/deploy.py
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in wrapper(x)]
    for w, g in zip(want, got):
        assert g.shape == w.shape and np.abs(g - w).max() <= 1e-4 * np.abs(w).max()
    torch.export.export(wrapper, (x,))


@pytest.mark.parametrize("text, ratio, macs", [
    ("0.3", 0.3, None), (" 0.25 ", 0.25, None), ("macs=80M", None, 80e6), ("80M", None, 80e6),
    ("macs=0.5x", None, 0.5), ("2.5G", None, 2.5e9), ("macs=500k", None, 5e5), ("macs=80e6", None, 80e6),
])
def test_parse_accepts_ratios_and_mac_budgets(text, ratio, macs):
    assert PruneTarget.parse(text) == PruneTarget(ratio=ratio, macs=macs)


@pytest.mark.parametrize("text", ["", "abc", "1.5", "0", "-0.3", "macs=", "macs=0", "macs=1.5x", "80T", "ratio=0.3",
                                  "macs=0.5", "macs=1"])
def test_parse_rejects_bad_text_naming_the_forms(text):
    with pytest.raises(ValueError, match=FORMS):
        PruneTarget.parse(text)


def test_target_needs_exactly_one_goal():
    with pytest.raises(ValueError, match="exactly one"):
        PruneTarget()
    with pytest.raises(ValueError, match="exactly one"):
        PruneTarget(ratio=0.3, macs=1e6)


def test_unreachable_budget_says_the_smallest_reached_and_leaves_the_model_alone():
    model = tiny()
    before = conv_out_channels(model)
    with pytest.raises(ValueError, match=r"MAC budget 1\.00M is unreachable: the smallest reached is [\d.]+M with every group at 8") as info:
        prune_student(model, PruneTarget.parse("macs=1M"), SIZE, log=lambda _: None)
    assert conv_out_channels(model) == before
    reached = float(str(info.value).split("the smallest reached is ")[1].split("M")[0])
    assert smallest_macs(model, SIZE) / 1e6 == pytest.approx(reached, abs=0.005)   # the floor, found up front
    with pytest.raises(ValueError, match=rf"1\.0M MACs is out of reach: .* still has {reached:.1f}M at "):
        check_budget(PruneTarget.parse("macs=1M"), model, SIZE)
    with pytest.raises(ValueError, match=r"prunes nothing: the student has [\d.]+M at 64x96; ask for less"):
        check_budget(PruneTarget.parse("1G"), model, SIZE)
    check_budget(PruneTarget.parse("macs=0.5x"), model, SIZE)   # reachable: no error


def test_stage_targets_remove_the_same_fraction_each_stage():
    assert stage_targets(PruneTarget(macs=0.5), 100e6, 1) == [PruneTarget(macs=0.5)]   # one stage: as given
    budgets = [t.macs for t in stage_targets(PruneTarget(macs=0.25), 100e6, 2)]
    assert budgets == pytest.approx([50e6, 25e6])
    budgets = [t.macs for t in stage_targets(PruneTarget(macs=20e6), 160e6, 3)]   # an absolute budget
    assert budgets == pytest.approx([80e6, 40e6, 20e6])
    with pytest.raises(ValueError, match="needs a MAC target"):
        stage_targets(PruneTarget(ratio=0.3), 100e6, 2)
    with pytest.raises(ValueError, match="at least 1"):
        stage_targets(PruneTarget(macs=0.5), 100e6, 0)


def test_one_pruning_target_names_one_export_directory():
    """`--prune 0.3` and `--prune 0.30` made two export directories for one pruning, neither refused
    as an existing export; two different values must still name two."""
    from quant.prune import prune_label

    assert prune_label("0.3") == prune_label("0.30") == prune_label(".3") == "0.3"
    assert prune_label("macs=0.50x") == prune_label(" 0.5X") == "0.5x"
    assert prune_label("80M") == prune_label("macs=80m") == prune_label("80.0M") == "80m"
    assert prune_label("80000000") == "80000000"
    assert prune_label("0.1234567") != prune_label("0.1234568")
    assert prune_label("macs=123456789") != prune_label("macs=123457000")
    with pytest.raises(ValueError, match="cannot parse prune target"):
        prune_label("half")
