"""The training optimizer: AdamW, or Muon for the dense convolutions beside AdamW for the rest.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") steps each weight matrix along
its momentum made (nearly) orthogonal: every direction of the update gets the same size, where
Adam's per-weight scaling lets a few dominant directions take the step. Conv kernels are matrices
of (output channels) x (input channels x kernel area). The orthogonalisation is a quintic
Newton-Schulz iteration: a few matrix products, on any device.

Which tensors take Muon (`muon_weights`): the hidden dense convolutions. AdamW keeps the rest, as
Muon's authors do: the image stem (its rows are three colour channels), the heads' output layers
(a depth or class map, not a hidden basis), the depthwise kernels, the squeeze-excite gates,
biases, norms and the loss weights. `train.muon_depthwise` gives the depthwise kernels to Muon too,
a layer's C filters of k x k taps as one C x k^2 matrix: better at the reduced size, not confirmed
at full length, so not a default (docs/TRAINING.md, "Muon on the depthwise kernels"); the gates
with them changed nothing beyond the seeds' spread, at 0.9x the images per second.
"""
from __future__ import annotations

import torch
from torch import nn

# The iteration's coefficients (Jordan et al.) pull the singular values of a normalised matrix
# into a band around 1 (about [0.7, 1.1] after five steps; after three, [0.4, 1.2] for a 30-fold
# spread), faster than the cubic iteration's exact 1. Three steps: five trained no better at the
# reduced size, at 0.2 x lr (docs/TRAINING.md, "Muon's step size").
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 3
# AdamW's typical update size (RMS about 0.2 x lr). Liu et al. 2025 ("Muon is scalable for LLM
# training") scale Muon's step to it, so that the AdamW learning rates and schedule serve both; v3
# takes four times it (`train.muon_rms`, docs/TRAINING.md "Muon's step size").
ADAMW_RMS = 0.2


def orthogonalize(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """`matrix` with its singular values moved towards 1 and its singular vectors kept.

    Each step is x <- q(G) x, with G = x x^T and q(G) = a + b G + c G^2. As q(G) is symmetric and
    commutes with G, the next Gram matrix is q(G) G q(G): the steps run on the short side's m x m
    Gram matrix, and the long side is read only twice (G once, the product of the q's applied
    once) instead of twice per step. The same polynomial in 0.7x the time for v3's 31 kernels."""
    a, b, c = NEWTON_SCHULZ
    x = matrix / (matrix.norm() + 1e-7)   # every singular value <= 1: inside the iteration's basin
    wide = x.shape[0] <= x.shape[1]
    if not wide:   # the Gram matrix of the shorter side is the cheaper one
        x = x.T
    gram = x @ x.T
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    product = identity
    for step in range(steps):
        q = a * identity + b * gram + c * gram @ gram
        product = q @ product
        if step + 1 < steps:
            gram = q @ gram @ q
    x = product @ x
    return x if wide else x.T


def muon_weights(model: nn.Module, depthwise: bool = False) -> list[nn.Parameter]:
    """The hidden dense convolutions' kernels, and the depthwise ones with `depthwise` (the module
    docstring says which stay with AdamW)."""
    found = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Conv2d) and module.in_channels > 3 and module.out_channels >= 16
                and ".se." not in f".{name}."):
            continue
        if module.groups == 1 or (depthwise and module.groups == module.in_channels):
            found.append(module.weight)
    return found


class MuonAdamW(torch.optim.AdamW):
    """AdamW whose groups marked `muon=True` step by Muon instead (Nesterov momentum, orthogonalised,
    decoupled weight decay; a step of `rms` x lr in RMS). One optimizer, so the schedule, the
    checkpoints and a resume treat it as they treat AdamW; a Muon tensor's state is its momentum and
    its step count."""

    def __init__(self, groups: list[dict], *, momentum: float = 0.95, rms: float = ADAMW_RMS, **adamw):
        super().__init__(groups, **adamw)
        self.muon_momentum = momentum
        self.muon_rms = rms

    @torch.no_grad()
    def step(self, closure=None):
        beta = self.muon_momentum
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.reshape(p.shape[0], -1)
                state = self.state[p]
                if "muon_momentum" not in state:   # "step" too: AdamW's load_state_dict reads it in every state
                    state["step"] = torch.tensor(0.0)
                    state["muon_momentum"] = torch.zeros_like(grad)
                state["step"] += 1
                momentum = state["muon_momentum"].mul_(beta).add_(grad)
                update = orthogonalize(grad.add(momentum, alpha=beta))   # Nesterov: the look-ahead
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.reshape(p.shape), alpha=-group["lr"] * self.muon_rms * max(update.shape) ** 0.5)
                p.grad = None   # AdamW skips a tensor without a gradient
        return super().step(closure)


def build_optimizer(model, weighting, cfg, feature_kd=None) -> torch.optim.AdamW:
    """The encoder and decoder groups at their own rates, D3epth's projections and Kendall's
    log-variances at the decoder's; `cfg.optimizer=muon` splits each group's Muon tensors off."""
    groups = [{"params": model.encoder_parameters(), "lr": cfg.lr_encoder, "name": "encoder"},
              {"params": model.decoder_parameters(), "lr": cfg.lr_decoder, "name": "decoder"}]
    if feature_kd is not None:  # D3epth's projections: trained with the decoder, not exported
        groups.append({"params": list(feature_kd.parameters()), "lr": cfg.lr_decoder, "name": "feature_kd"})
    extra = [p for p in weighting.parameters() if p.requires_grad]
    if extra:  # Kendall log-variances: decoder LR, no weight decay (it would pull sigma to 1)
        groups.append({"params": extra, "lr": cfg.lr_decoder, "weight_decay": 0.0, "name": "weighting"})
    # fused: one kernel over all of v3's 187 tensors instead of several per tensor, the same update
    # rule; on 2 CPU cores the step fell from 8.9 to 2.7 ms of ~230 ms per batch (cProfile, 62 steps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
    chosen = {id(p) for p in muon_weights(model, depthwise=cfg.muon_depthwise)}
    split = []
    for group in groups:
        split.append({**group, "params": [p for p in group["params"] if id(p) not in chosen]})
        mine = [p for p in group["params"] if id(p) in chosen]
        if mine:
            split.append({**group, "params": mine, "muon": True, "name": f"{group['name']}_muon"})
    return MuonAdamW(split, rms=cfg.muon_rms, weight_decay=cfg.weight_decay, fused=True)
