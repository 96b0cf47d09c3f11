"""Distilling a routing decision into a lightweight router (StableMoE, docs/ALGORITHMS.md §2-3).

Stage 1 trains a distilled router D (a token-id model, see :mod:`.distilled`) to predict the
backbone's assignment ``a_t``; its scores are ``s^_{t,i} = E^_i . D(x)_t``:

    L_dis = - sum_t log softmax(s^_t)[a_t] / num_tokens

returned UNWEIGHTED and as a PER-TOKEN MEAN over the counting set (paper eq. 10 sums over the
batch; fairseq divides summed losses by the token count). The teacher ids are a detached target:
the loss trains D and E^ only, never the backbone. Stage 2 routes with
``distilled_assignment`` (argmax of the frozen distilled scores).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import as_token_count, compute_dtype


def distillation_loss(
    student_scores: torch.Tensor,
    teacher_expert_ids: torch.Tensor,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the distilled scores against the backbone's assignment, summed / num_tokens.

    Args:
        student_scores: ``[T, N]`` distilled scores s^ of the local tokens.
        teacher_expert_ids: LongTensor ``[T]``, the stage-1 assignment a_t (treated as a constant).
        num_tokens: counting-set size; None: T. Pass the global size when the tokens are split
            over ranks and sum the partial losses.
    Returns:
        0-d tensor (float32, float64 for float64 scores), differentiable w.r.t. ``student_scores``.
    """
    dtype = compute_dtype(student_scores)
    total = as_token_count(num_tokens, student_scores.device, dtype, default=student_scores.shape[0])
    summed = F.cross_entropy(
        student_scores.to(dtype), teacher_expert_ids.detach().reshape(-1), reduction="sum"
    )
    return summed / total


@torch.no_grad()
def distillation_agreement(student_scores: torch.Tensor, teacher_expert_ids: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens whose distilled argmax equals the teacher's expert: 0-d float tensor.

    A monitoring metric (no gradient); 0 for an empty batch. Stays on the input's device.
    """
    matches = (student_scores.argmax(dim=-1) == teacher_expert_ids.reshape(-1)).float().sum()
    return matches / max(student_scores.shape[0], 1)


def distilled_assignment(student_scores: torch.Tensor) -> torch.Tensor:
    """Stage-2 routing: LongTensor ``[T]`` = argmax of the frozen distilled scores (ties: lowest index)."""
    return student_scores.detach().argmax(dim=-1)
