"""Multi-task loss weighting: how per-task losses (depth, segmentation, ...) become one total.

Contract of every module in `WEIGHTINGS` (built by `build_weighting(name, tasks, **options)`,
where `tasks` maps task name -> kind, "regression" or "classification", e.g.
`{"depth": "regression", "seg": "classification"}`):

- `forward(losses: dict[str, Tensor]) -> (total, weights)`: `losses` holds one 0-d tensor per task
  (exactly the tasks given at construction); `total` is the 0-d float32 tensor to back-propagate;
  `weights` maps task -> effective multiplier of that task's loss, as floats for logging.
- `epoch_end(mean_losses: dict[str, float]) -> None`: called once per epoch with the epoch-averaged
  *unweighted* loss of each task (DWA uses it; the others ignore it).
- All state (learned parameters, loss history) lives in `state_dict()`, so a resumed run continues
  exactly. Trainable parameters (Kendall's log-variances) must be given to the optimiser.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.registry import Registry

WEIGHTINGS: Registry[type["LossWeighting"]] = Registry("loss weighting")
TASK_KINDS = ("regression", "classification")


def build_weighting(name: str, tasks: dict[str, str], **options) -> "LossWeighting":
    """Build a registered weighting, e.g. `build_weighting("dwa", {"depth": "regression",
    "seg": "classification"}, temperature=2.0)`."""
    return WEIGHTINGS.get(name)(tasks, **options)


class LossWeighting(nn.Module):
    """Base class: validates the task table and the keys of every `losses` dict."""

    def __init__(self, tasks: dict[str, str]):
        super().__init__()
        if not tasks:
            raise ValueError("tasks is empty; pass e.g. {'depth': 'regression', "
                             "'seg': 'classification'}.")
        for task, kind in tasks.items():
            if kind not in TASK_KINDS:
                raise ValueError(f"task {task!r} has kind {kind!r}; valid kinds: "
                                 f"{', '.join(TASK_KINDS)}.")
        self.tasks: dict[str, str] = dict(tasks)

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def _check_keys(self, given: dict) -> None:
        missing = [t for t in self.tasks if t not in given]
        extra = [t for t in given if t not in self.tasks]
        if missing or extra:
            raise ValueError(f"{type(self).__name__} was built for tasks {self.names}; got "
                             f"{list(given)} (missing {missing}, unexpected {extra}).")

    def epoch_end(self, mean_losses: dict[str, float]) -> None:
        """Per-epoch update from epoch-averaged unweighted losses; a no-op unless overridden."""
        self._check_keys(mean_losses)

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


@WEIGHTINGS.register("fixed")
class FixedWeighting(LossWeighting):
    """total = sum_k w_k * L_k with constant weights (default 1.0 for every task). No state."""

    def __init__(self, tasks: dict[str, str], weights: dict[str, float] | None = None):
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = [t for t in weights if t not in self.tasks]
        if unknown:
            raise ValueError(f"weights given for unknown tasks {unknown}; tasks are {self.names}.")
        self.weights: dict[str, float] = {t: float(weights.get(t, 1.0)) for t in self.tasks}

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        self._check_keys(losses)
        total = sum(self.weights[t] * losses[t].float() for t in self.tasks)
        return total, dict(self.weights)


@WEIGHTINGS.register("kendall")
class KendallWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting, Kendall, Gal & Cipolla, CVPR 2018.

    One learned s_k = log sigma_k^2 per task (a trainable `nn.Parameter`, initialised to `init`,
    default 0). Per-task term, following the paper's derivation:
      - "regression" (Gaussian likelihood):     0.5 * exp(-s) * L + 0.5 * s
      - "classification" (softmax likelihood):  exp(-s) * L + 0.5 * s
    The task kind given at construction picks the form. Many repositories use the regression form
    for every task; pass kind "regression" for all tasks to get that variant.
    Effective weight reported: 0.5 * exp(-s) or exp(-s). The total may be negative (s < 0 terms).
    """

    def __init__(self, tasks: dict[str, str], init: float = 0.0):
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def _factor(self, task: str) -> float:
        return 0.5 if self.tasks[task] == "regression" else 1.0

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        self._check_keys(losses)
        total = torch.zeros((), dtype=torch.float32, device=self.log_vars.device)
        weights: dict[str, float] = {}
        for i, task in enumerate(self.tasks):
            s = self.log_vars[i].float()
            weight = self._factor(task) * torch.exp(-s)
            total = total + weight * losses[task].float() + 0.5 * s
            weights[task] = float(weight.detach())
        return total, weights


@WEIGHTINGS.register("dwa")
class DWAWeighting(LossWeighting):
    """Dynamic Weight Average, Liu, Johns & Davison, CVPR 2019 (MTAN); used by D3epth.

    lambda_k = K * exp(w_k / T) / sum_i exp(w_i / T),  w_k = L_k(t-1) / L_k(t-2),
    with L_k the epoch-averaged unweighted loss handed to `epoch_end`, K the number of tasks and
    temperature T (default 2). lambda_k = 1 during the first two epochs (no ratio yet); the weights
    always sum to K. A zero previous loss is floored at 1e-12 so the ratio stays finite.
    State lives in float32 buffers (tensor-only `state_dict()`, safetensors-friendly, any device):
    `loss_history` (2, K) = losses of epochs t-2 and t-1, `epochs_seen` (0-d int64), `lambdas` (K,).
    The weights are computed in float64 from those buffers, so a resumed run gets the same numbers.
    """

    def __init__(self, tasks: dict[str, str], temperature: float = 2.0):
        super().__init__(tasks)
        if not temperature > 0:
            raise ValueError(f"DWA temperature={temperature!r} must be > 0 (the paper uses 2).")
        self.temperature = float(temperature)
        k = len(self.tasks)
        self.register_buffer("loss_history", torch.zeros(2, k))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("lambdas", torch.ones(k))

    def epoch_end(self, mean_losses: dict[str, float]) -> None:
        self._check_keys(mean_losses)
        values = [float(mean_losses[t]) for t in self.tasks]
        bad = {t: v for t, v in zip(self.tasks, values) if not math.isfinite(v)}
        if bad:
            raise ValueError(f"DWA got non-finite epoch losses {bad}; fix the loss before "
                             "weighting (a NaN here would poison every later weight).")
        new = torch.tensor(values, dtype=self.loss_history.dtype, device=self.loss_history.device)
        self.loss_history.copy_(torch.stack([self.loss_history[1], new]))
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            older, newer = self.loss_history.double().cpu()
            w = newer / older.clamp_min(1e-12)
            lambdas = len(self.tasks) * torch.softmax(w / self.temperature, dim=0)
            self.lambdas.copy_(lambdas.to(self.lambdas.dtype))

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        self._check_keys(losses)
        lambdas = self.lambdas.tolist()
        total = sum(lam * losses[t].float() for lam, t in zip(lambdas, self.tasks))
        return total, dict(zip(self.tasks, lambdas))
