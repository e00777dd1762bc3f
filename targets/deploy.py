"""The deployable graph: what every artefact computes, and how it leaves PyTorch (the parent's side
of targets/: converter processes never import this module, nor torch).

`DeployModel` implements the artefact contract of core/contract.py: input `image` (1, 3, H, W) float32 RGB in [0, 1] (the
ImageNet normalisation is inside the graph, so apps feed camera pixels / 255), outputs `depth`
(1, 1, H, W) in the training space's units (metres for metric recipes) and `seg` (1, C, H, W)
logits. Two separate outputs: depth in metres and segmentation logits never share one tensor,
so an int8 converter gives each its own scale (docs/TOOLCHAIN.md).

The graph leaves PyTorch as the format table's `source_graph` (core/formats.py): ONNX (through
torch.export, static shapes: onnx2tf and onnxruntime's quantiser consume it; the deprecated
TorchScript exporter only as a recorded fallback) or a torch.export program (.pt2; coremltools
needs that path).
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import torch
from timm.models.efficientvit_mit import LiteMLA
from torch import nn

from core.contract import IMAGENET_MEAN, IMAGENET_STD, INPUT_NAME, OUTPUT_NAMES

ONNX_OPSET = 18   # torch.export's ONNX exporter starts at 18 (ReduceMean takes its axes as an input)


class LinearAttention(nn.Module):
    """EfficientViT's LiteMLA (timm), the same function in a form int8 quantisers handle.

    timm computes out = num / den from one matmul, q @ (k^T [v | 1]): numerator and denominator are
    columns of one tensor, so an int8 graph gives them one scale, sized for the numerator (~10^4 on
    v4), and the denominator loses its digits. Here num = q @ (k^T v) and den = q @ sum_n k_n are
    separate tensors. Measured on the v4 CPU-default run, ONNX int8 QDQ by post-training
    quantisation, 100 validation images: abs_rel +1.27% and miou -1.04 points against the float
    model, where timm's form drifts +10.6% and -3.36. (TFLite keeps the whole attention in float
    anyway: targets/tflite_file.py, `float_islands`.)
    """

    # fp16's range (Core ML, GPU delegates) ends at 65504. timm's form reached 2.6e8 in num on the
    # 9-epoch v4 run, so every Core ML file computed inf and NaN. Fixed scales (q / 256, k / N) held
    # that student below 8.1e3, but the next one (deep supervision, 2026-12-02) reached 2.6e5 in num
    # and 5.2e4 in k^T v: how large q and k grow depends on the student. So q is divided by its
    # largest value per row and k by its largest per head and by N (N tokens; both are >= 0 after the
    # kernel function). num and den are both linear in a row of q and in k, so the quotient is
    # unchanged, and for any student |k^T v| <= max |v|, |num| <= dim max |v| and den <= dim. timm's
    # eps (1e-5), divided alike, would fall below fp16's smallest normal number, TINY, at which den is
    # held instead: a row of zero queries gives 0, not 0 / 0, and the depth of two trained v4 students
    # moved by at most 4.7e-7 relative from the student's (64 validation images, fp32).
    TINY = 2.0 ** -14

    def __init__(self, mla: LiteMLA):
        super().__init__()
        self.qkv, self.aggreg, self.kernel_func, self.proj = mla.qkv, mla.aggreg, mla.kernel_func, mla.proj
        self.dim = mla.dim   # timm's eps: below TINY once scaled (above)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        q, k, v = qkv.reshape(b, -1, 3 * self.dim, h * w).transpose(-1, -2).chunk(3, dim=-1)   # (B, heads, N, dim)
        out = self.attend(self.kernel_func(q), self.kernel_func(k), v)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))

    @classmethod
    def attend(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(q k^T v) / (q k^T 1) for q, k, v (..., N, dim) after the kernel function, in fp16's range."""
        n = k.shape[-2]
        q_max = q.amax(dim=-1, keepdim=True).clamp_min(cls.TINY)           # (..., N, 1)
        k_max = k.amax(dim=(-2, -1), keepdim=True).clamp_min(cls.TINY)     # (..., 1, 1)
        q, k_t = q / q_max, (k / k_max * (1.0 / n)).transpose(-1, -2)   # k_max * n could leave fp16's range
        num = q @ (k_t @ v)                             # (..., N, dim)
        den = q @ k_t.sum(dim=-1, keepdim=True)         # (..., N, 1)
        return num / den.clamp_min(cls.TINY)


def deploy_form(student: nn.Module) -> nn.Module:
    """A copy of `student` with every module swapped for its deploy form (same function, within
    float rounding); the student itself, when nothing needs swapping."""
    if not any(isinstance(m, LiteMLA) for m in student.modules()):
        return student
    student = copy.deepcopy(student)
    for name, module in list(student.named_modules()):
        if isinstance(module, LiteMLA):
            parent, _, attr = name.rpartition(".")
            setattr(student.get_submodule(parent) if parent else student, attr, LinearAttention(module))
    return student


class DeployModel(nn.Module):
    """The artefact's function. `rows_width`: the normalisation as image * a + b with a = 1/std and
    b = -mean/std repeated along a row of that width, (1, 3, 1, W): in NHWC the constants then
    broadcast over rows only, which XNNPACK streams (targets/litert_graph.py,
    `normalization_over_rows`, has the measurement); 0 = (image - mean) / std."""

    def __init__(self, student: nn.Module, rows_width: int = 0):
        super().__init__()
        check_both_tasks(student)
        self.student = deploy_form(student)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.rows = rows_width > 0
        if self.rows:
            self.register_buffer("scale", (1.0 / std).expand(1, 3, 1, rows_width).contiguous())
            self.register_buffer("shift", (-mean / std).expand(1, 3, 1, rows_width).contiguous())
        else:
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.student(image * self.scale + self.shift if self.rows else (image - self.mean) / self.std)
        return out["depth"], out["seg"]


def check_both_tasks(student: nn.Module) -> None:
    """Every artefact has a depth and a segmentation output (core/contract.py); a student trained
    without its segmentation head (model.tasks=depth, an ablation) cannot fill the contract."""
    tasks = getattr(student, "tasks", ("depth", "seg"))
    if set(tasks) != {"depth", "seg"}:
        raise ValueError(f"the student predicts {', '.join(tasks)} only (model.tasks={','.join(tasks)}); artefacts "
                         f"have a depth and a segmentation output: export a run trained with model.tasks=depth,seg")


def example_input(height: int, width: int) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def export_onnx(student: nn.Module, path: Path, height: int, width: int) -> tuple[Path, str]:
    """ONNX through torch.export (torch's maintained exporter); the TorchScript exporter, which
    torch deprecated, only when that fails, and the returned description says so and why."""
    model, args = DeployModel(student).eval(), (example_input(height, width),)
    names = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES), "opset_version": ONNX_OPSET}
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # its progress lines are not ours to print
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, verbose=False, **names)
        return path, f"torch.export (torch.onnx.export dynamo=True, opset {ONNX_OPSET})"
    except Exception as e:   # noqa: BLE001 - any failure of the new exporter falls back, recorded
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    with warnings.catch_warnings():  # the tracer warns about the student's input-size check
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, **names)
    return path, f"torchscript (legacy fallback, opset {ONNX_OPSET}; torch.export failed: {reason})"


def export_program(student: nn.Module, path: Path, height: int, width: int, form: str = "") -> Path:
    """A torch.export program of the artefact's function; `form` "xnnpack-float" / "xnnpack-int8":
    with the rewrites XNNPACK needs (`xnnpack_form`, normalisation along rows) applied first."""
    if form not in ("", "xnnpack-float", "xnnpack-int8"):
        raise ValueError(f"unknown deploy form {form!r}: use xnnpack-float or xnnpack-int8")
    if form:
        from targets.xnnpack_form import defer_sixths, xnnpack_form

        model = DeployModel(xnnpack_form(student, int8=form == "xnnpack-int8"), rows_width=width).eval()
        defer_sixths(model, example_input(height, width))
    else:
        model = DeployModel(student).eval()
    program = torch.export.export(model, (example_input(height, width),))
    torch.export.save(program, str(path))
    return path


@torch.no_grad()
def reference_outputs(student: nn.Module, images: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch model's (depth, seg) on (N, 3, H, W) images in [0, 1]: what artefacts must match.
    `student` is left in the mode it came in (DeployModel wraps it, and eval() reaches it)."""
    modes = {module: module.training for module in student.modules()}   # a caller's frozen norms too
    try:
        model = DeployModel(student).eval()
        outs = [model(images[i:i + batch]) for i in range(0, len(images), batch)]
    finally:
        for module, training in modes.items():
            module.training = training
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def export_source(student: nn.Module, graph: str, path_stem: Path, height: int, width: int,
                  form: str = "") -> tuple[Path, str]:
    """The converter's input as the format table names it ("onnx" -> .onnx, "torch.export" -> .pt2),
    and how it was made (recorded in the manifest). `form`: see `export_program`."""
    if graph == "torch.export":
        path = export_program(student, path_stem.with_suffix(".pt2"), height, width, form)
        return path, "torch.export (.pt2)" + (f", {form} deploy form" if form else "")
    if graph == "onnx":
        return export_onnx(student, path_stem.with_suffix(".onnx"), height, width)
    raise ValueError(f"unknown source graph {graph!r}; core/formats.py names onnx or torch.export")
