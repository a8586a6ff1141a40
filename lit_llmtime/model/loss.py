"""Next-token cross-entropy through the output layer without ever holding the (tokens, vocabulary)
logits: Qwen2.5's 151,936-row output matrix makes them about 1.9 GB in float32 at batch 4 x 768.

The frozen output layer is applied chunk by chunk; each chunk's loss and its gradient with respect
to the hidden states are computed at once (as the fused kernels of liger-kernel do), so only one
chunk of logits exists at a time and backward is a multiplication. On CUDA, when liger-kernel is
installed, its fused Triton kernel does the same work.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from lit_llmtime.data.windows import IGNORE_INDEX

log = logging.getLogger(__name__)
CHUNK = 128  # positions per chunk: 128 x 151,936 float32 logits are 78 MB


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, for a frozen weight."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: D102 (torch.autograd.Function API)
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        for start in range(0, len(hidden), chunk):
            rows, target = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(rows, weight, bias).float()
            labelled = target != IGNORE_INDEX
            safe = target.clamp(min=0)
            chosen = logits.gather(1, safe[:, None]).squeeze(1)
            # log-sum-exp and softmax in the one buffer: the chunk's logits are never copied
            peak = logits.max(dim=-1, keepdim=True).values
            probabilities = logits.sub_(peak).exp_()
            norm = probabilities.sum(dim=-1)
            loss += ((peak.squeeze(1) + norm.log() - chosen) * labelled).sum()
            if grad_hidden is None and grad_bias is None:
                continue
            grad_logits = probabilities.div_(norm[:, None])  # softmax - one-hot, 0 where unlabelled
            grad_logits[torch.arange(len(target), device=target.device), safe] -= 1
            grad_logits *= labelled[:, None]
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_logits.to(weight.dtype) @ weight
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        grad_hidden, grad_bias = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
            None,
            None if grad_bias is None else (grad_bias * grad_loss).to(ctx.bias_dtype),
            None,
            None,
        )


@functools.cache
def fused_loss() -> nn.Module | None:
    """liger-kernel's fused linear cross-entropy (summed, accumulating in float32 where the version
    can: ``accum_dtype``, liger-kernel >= 0.6.2), or None when it cannot be imported (said once)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        if importlib.util.find_spec("liger_kernel") is not None:  # installed, but broken here
            log.warning(f"liger-kernel cannot be imported ({error}); the loss runs chunked instead")
        return None
    options: dict = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters:
        options["accum_dtype"] = torch.float32
    return LigerFusedLinearCrossEntropyLoss(**options)


def loss_path(hidden: torch.Tensor, head: nn.Module) -> str:
    """Which training loss runs for these hidden states and this output layer: ``fused``
    (liger-kernel, CUDA), ``chunked`` (ours) or ``autograd`` (a trained or adapted output layer)."""
    if not isinstance(head, nn.Linear) or head.weight.requires_grad:
        return "autograd"
    return "fused" if hidden.is_cuda and fused_loss() is not None else "chunked"


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    rows: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``head(hidden)`` (N, d) against ``targets`` (N,), ignoring
    ``IGNORE_INDEX``. With ``rows`` only those output rows are scored and ``targets`` index them."""
    weight, bias = head.weight, head.bias
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    path = loss_path(hidden, head)
    if path == "autograd":  # a trained output matrix
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, IGNORE_INDEX, reduction="sum")
    if path == "fused":
        return fused_loss()(weight, hidden, targets, bias)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


def row_targets(targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Vocabulary ids as indices into ``rows`` (the output rows a restricted head computes)."""
    size = max(int(targets.max()), int(rows.max())) + 1
    lookup = torch.full((size,), -1, dtype=torch.long, device=targets.device)
    lookup[rows] = torch.arange(len(rows), device=targets.device)
    labelled = targets != IGNORE_INDEX
    mapped = torch.where(labelled, lookup[targets.clamp(min=0)], IGNORE_INDEX)
    if (mapped[labelled] < 0).any():
        outside = sorted(set(targets[labelled & (mapped < 0)].tolist()))[:5]
        raise ValueError(
            f"tokens {outside} are not LLMTIME characters, so the llmtime output head cannot score them; "
            "use model.output_vocab: full"
        )
    return mapped


def training_loss(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled ``targets`` of (N, d) ``hidden``, over the
    whole vocabulary or (``rows``) those output rows alone; the output layer applied in chunks."""
    scored = targets if rows is None else row_targets(targets, rows)
    if isinstance(head, nn.Linear):
        total = linear_cross_entropy(hidden, head, scored, rows)
    else:  # an adapted output layer (lora.targets with lm_head): plain logits
        logits = head(hidden).float()
        total = F.cross_entropy(logits if rows is None else logits[:, rows], scored, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def evaluation_losses(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, rows: torch.Tensor | None, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy over the whole vocabulary and, with ``rows``, over those rows only,
    from the same chunks of logits (no second product through the output layer)."""
    full = hidden.new_zeros((), dtype=torch.float32)
    restricted = None if rows is None else hidden.new_zeros((), dtype=torch.float32)
    mapped = None if rows is None else row_targets(targets, rows)
    for start in range(0, len(hidden), chunk):
        logits, target = head(hidden[start : start + chunk]).float(), targets[start : start + chunk]
        full += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        if rows is not None:
            restricted += F.cross_entropy(
                logits[:, rows], mapped[start : start + chunk], ignore_index=IGNORE_INDEX, reduction="sum"
            )
    return full, restricted
