"""Distilling a routing decision into a lightweight router (StableMoE, docs/ALGORITHMS.md §2-3).

Stage 1 trains a distilled router D (a token-id model, see :mod:`.distilled`) to predict the
backbone's assignment ``a_t``; its scores are ``s^_{t,i} = E^_i . D(x)_t``:

    L_dis = - sum_t log softmax(s^_t)[a_t] / num_tokens

returned UNWEIGHTED and as a PER-TOKEN MEAN over the counting set (paper eq. 10 sums over the
batch; fairseq divides summed losses by the token count). The teacher ids are a detached target:
the loss trains D and E^ only, never the backbone. Stage 2 routes with
``distilled_assignment`` (argmax of the frozen distilled scores).

Top-k (``--moe-router-topk`` k > 1): the teacher is the router's k experts ``A_t`` (``[T, k]``) and

    L_dis = - sum_t (1/k) sum_{i in A_t} log softmax(s^_t)[i] / num_tokens

the mean of k cross-entropies, i.e. the cross-entropy against the uniform distribution over the
teacher's set. Why this loss: it is the paper's loss at k = 1 (bit for bit here), it trains the
same softmax scores whose k largest route in stage 2, and its minimum puts mass 1/k on each teacher
expert, so the student's top-k is the teacher's SET; the order inside the set is not learned
because it does not matter (stage-2 gates come from the backbone scores). A per-expert sigmoid
(multi-label) loss would not reduce to the paper's at k = 1. Stage 2 routes with the k largest
distilled scores (``distilled_assignment(scores, topk=k)``).
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
        teacher_expert_ids: LongTensor ``[T]``, the stage-1 assignment a_t (treated as a constant);
            or ``[T, k]``, the top-k set: the mean of the k cross-entropies (module docstring).
        num_tokens: counting-set size; None: T. Pass the global size when the tokens are split
            over ranks and sum the partial losses.
    Returns:
        0-d tensor (float32, float64 for float64 scores), differentiable w.r.t. ``student_scores``.
    """
    dtype = compute_dtype(student_scores)
    total = as_token_count(num_tokens, student_scores.device, dtype, default=student_scores.shape[0])
    teacher = teacher_expert_ids.detach()
    if teacher.dim() == 2:  # top-k: [T, k]
        log_probs = torch.log_softmax(student_scores.to(dtype), dim=-1)
        return -log_probs.gather(1, teacher).sum() / (total * teacher.shape[1])
    summed = F.cross_entropy(student_scores.to(dtype), teacher.reshape(-1), reduction="sum")
    return summed / total


@torch.no_grad()
def distillation_agreement(student_scores: torch.Tensor, teacher_expert_ids: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens whose distilled argmax equals the teacher's expert: 0-d float tensor.

    With a top-k teacher ``[T, k]``: the fraction of the teacher's (token, expert) pairs that are
    among the student's k largest scores (1 when every token's set is predicted).
    A monitoring metric (no gradient); 0 for an empty batch. Stays on the input's device.
    """
    if teacher_expert_ids.dim() == 2:
        k = teacher_expert_ids.shape[1]
        student = distilled_assignment(student_scores, topk=k)  # [T, k]
        found = (student.unsqueeze(2) == teacher_expert_ids.unsqueeze(1)).any(dim=1)  # [T, k]
        return found.float().sum() / max(found.numel(), 1)
    matches = (student_scores.argmax(dim=-1) == teacher_expert_ids.reshape(-1)).float().sum()
    return matches / max(student_scores.shape[0], 1)


def distilled_assignment(student_scores: torch.Tensor, topk: int = 1) -> torch.Tensor:
    """Stage-2 routing: LongTensor ``[T]`` = argmax of the frozen distilled scores ``[T, N]`` (ties:
    lowest index); for ``topk`` k > 1 ``[T, k]``, the k largest, by descending score."""
    if topk == 1:
        return student_scores.detach().argmax(dim=-1)
    return torch.topk(student_scores.detach(), topk, dim=-1).indices
