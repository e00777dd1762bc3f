"""The training optimizer (distill/training/optim.py): Muon's orthogonalisation, which tensors take
it, the size of its step, and a checkpoint that continues it exactly."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from distill.run import main
from distill.students import build_student
from distill.training.optim import (ADAMW_RMS, NEWTON_SCHULZ, MuonAdamW, build_optimizer,
                                    muon_weights, orthogonalize)

CFG = SimpleNamespace(lr_encoder=1e-2, lr_decoder=2e-2, weight_decay=0.0, optimizer="muon", muon_rms=0.8,
                      muon_depthwise=False)


@pytest.mark.parametrize("shape", [(16, 144), (144, 16), (64, 64)])
def test_orthogonalize_keeps_the_singular_vectors_and_moves_the_values_towards_one(shape):
    """A matrix of singular values spread 30-fold, scaled by 37: the result has the same singular
    vectors (close to the exact polar factor U V^T) and singular values within the quintic
    iteration's band around 1, which more steps narrow."""
    m, n = shape
    k = min(m, n)
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    matrix = u @ torch.diag(37 * torch.logspace(-1.5, 0, k)) @ v.T
    polar = u @ v.T
    for steps, lowest in ((3, 0.35), (5, 0.6)):   # 3: the optimizer's
        result = orthogonalize(matrix, steps)
        values = torch.linalg.svdvals(result)
        assert result.shape == matrix.shape and lowest < values.min() and values.max() < 1.25, (steps, values)
        assert torch.nn.functional.cosine_similarity(result.flatten(), polar.flatten(), dim=0) > 0.96


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(64, 576), (576, 96), (16, 16)])
def test_orthogonalize_runs_the_textbook_iteration_on_the_gram_matrix(shape, steps):
    """The Gram-space form gives what the iteration written out on the matrix gives (x <- a x +
    (b G + c G^2) x with G = x x^T, every step), to float32 rounding."""
    a, b, c = NEWTON_SCHULZ
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x = matrix / matrix.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    result = orthogonalize(matrix, steps)
    assert (result - x).norm() / x.norm() < 1e-5


def test_muon_takes_the_hidden_dense_convolutions_and_adamw_the_rest():
    model = build_student("mobilenetv3_small_100")
    names = {id(p): name for name, p in model.named_parameters()}
    chosen = {names[id(p)] for p in muon_weights(model)}
    assert "encoder.blocks.1.0.conv_pw.weight" in chosen and "encoder.blocks.4.2.conv_pwl.weight" in chosen
    assert "decoder.lateral.3.0.weight" in chosen and "heads.seg.body.0.weight" in chosen
    for left in ("encoder.conv_stem.weight",            # three colour channels in
                 "encoder.blocks.1.0.conv_dw.weight",   # depthwise: a filter per channel
                 "encoder.blocks.2.0.se.conv_reduce.weight", "heads.depth.out.weight", "heads.seg.out.weight"):
        assert left not in chosen, left
    assert all(name.endswith(".weight") for name in chosen)

    optimizer = build_optimizer(model, torch.nn.Module(), CFG)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())   # each tensor in one group
    muon = {id(p) for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    assert muon == {id(p) for p in muon_weights(model)}
    assert optimizer.muon_rms == CFG.muon_rms   # the recipe's step size, not the class default
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"encoder": 1e-2, "encoder_muon": 1e-2, "decoder": 2e-2, "decoder_muon": 2e-2}


def test_muon_depthwise_adds_each_depthwise_layer_and_leaves_the_rest_to_adamw():
    model = build_student("mobilenetv3_small_100")
    names = {id(p): name for name, p in model.named_parameters()}
    dense = {names[id(p)] for p in muon_weights(model)}
    chosen = {names[id(p)] for p in muon_weights(model, depthwise=True)}
    depthwise = {f"{name}.weight" for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
    assert len(depthwise) == 11 and chosen == dense | depthwise   # MobileNetV3-Small's 11 blocks
    assert not chosen & {"encoder.conv_stem.weight", "encoder.blocks.2.0.se.conv_reduce.weight", "heads.seg.out.weight"}
    optimizer = build_optimizer(model, torch.nn.Module(), SimpleNamespace(**{**vars(CFG), "muon_depthwise": True}))
    muon = {names[id(p)] for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    assert muon == chosen


def test_a_muon_step_has_the_size_asked_whatever_the_gradients_scale():
    """A kernel's first step is lr x 0.2 in RMS (AdamW's typical step) by default, and lr x `rms`
    when given, for gradients a million times apart; weight decay shrinks the kernel first, as
    AdamW's decoupled decay does."""
    for scale, size, groups in ((1e-4, None, 1), (1e2, None, 1), (1e-4, 0.8, 1), (1e2, 0.8, 1), (1e-4, 0.8, 64)):
        conv = torch.nn.Conv2d(64 if groups > 1 else 32, 64, 3, groups=groups)   # 64: a depthwise 64 x 9 matrix
        before = conv.weight.detach().clone()
        optimizer = MuonAdamW([{"params": [conv.weight], "muon": True}, {"params": [conv.bias]}], lr=1e-2,
                              weight_decay=0.0, **({} if size is None else {"rms": size}))
        conv.weight.grad = scale * torch.randn_like(conv.weight)
        conv.bias.grad = torch.randn_like(conv.bias)
        optimizer.step()
        rms = (conv.weight.detach() - before).pow(2).mean().sqrt().item()
        expected = (ADAMW_RMS if size is None else size) * 1e-2
        assert 0.6 * expected < rms < 1.25 * expected, (scale, size, groups, rms)
        assert "muon_momentum" in optimizer.state[conv.weight] and "exp_avg" in optimizer.state[conv.bias]
    decayed = torch.nn.Parameter(torch.ones(16, 16, 1, 1))
    optimizer = MuonAdamW([{"params": [decayed], "muon": True}], lr=0.1, weight_decay=0.5)
    decayed.grad = torch.zeros_like(decayed)
    optimizer.step()
    assert torch.allclose(decayed, torch.full_like(decayed, 0.95))   # a zero gradient: decay alone


def test_a_checkpointed_muon_optimizer_continues_exactly():
    def steps(model, optimizer, count, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(count):
            optimizer.zero_grad()
            model(torch.rand(2, 3, 32, 32, generator=generator))["depth"].log().square().mean().backward()
            optimizer.step()

    torch.manual_seed(0)
    straight = build_student("mobilenetv3_small_050", decoder_channels=16)
    resumed = build_student("mobilenetv3_small_050", decoder_channels=16)
    resumed.load_state_dict(straight.state_dict())
    first = build_optimizer(straight, torch.nn.Module(), CFG)
    steps(straight, first, 2, seed=1)
    saved = copy.deepcopy(first.state_dict())   # its tensors are the live state, updated in place
    steps(straight, first, 2, seed=2)

    steps(resumed, build_optimizer(resumed, torch.nn.Module(), CFG), 2, seed=1)
    again = build_optimizer(resumed, torch.nn.Module(), CFG)
    again.load_state_dict(saved)
    steps(resumed, again, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_v3_trains_with_muon_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    tiny = ["model.student=mobilenetv3_small_050", "model.decoder_channels=16", "data.height=64", "data.width=96",
            "data.num_train=16", "data.num_val=4", "train.batch_size=8", "eval.preview_images=0", "train.epochs=1"]
    assert main(["v3", *tiny, "train.optimizer=muon", "train.muon_depthwise=true", f"out_dir={tmp_path}", "--quiet"]) == 0
    (run,) = tmp_path.glob("v3-*")
    train = json.loads((run / "config.json").read_text())["train"]
    assert train["optimizer"] == "muon" and train["muon_depthwise"] is True
    assert 0 < json.loads((run / "summary.json").read_text())["abs_rel"] < 1
    # the loop built Muon, not AdamW under Muon's name: the checkpoint holds Muon's momentum buffers
    from core.weights import latest_checkpoint, load_state
    states = load_state(latest_checkpoint(run / "checkpoints") / "state.pt")["optimizer"]["state"].values()
    assert 0 < sum("muon_momentum" in state for state in states) < len(states)   # and AdamW's for the rest
    assert main(["v3", "train.optimizer=lion"]) == 2   # a value outside the choices, refused before any work
    assert main(["v3", "train.muon_rms=0"]) == 2        # a step of no size
    assert main(["v1", "train.muon_depthwise=true"]) == 2   # v1 trains with AdamW, which would ignore it
    from core.config import apply_overrides
    from distill.recipes import get_recipe
    from distill.recipes.base import range_problems
    assert range_problems(apply_overrides(get_recipe("v1"), ["train.muon_depthwise=true"])) == [
        "train.muon_depthwise=true gives the depthwise kernels to Muon, and train.optimizer=adamw; add "
        "train.optimizer=muon, or drop train.muon_depthwise"]
