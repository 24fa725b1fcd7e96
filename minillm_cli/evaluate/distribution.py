"""Token-level distribution metrics between a student q and a teacher p (held-out evaluation).

Everything here works on full-vocabulary next-token distributions from a teacher-forced forward of
both models over the same prompt + continuation. Per response position t (a valid token of the
continuation y):

    forward KL   KL(p‖q)_t = sum_v p(v | x, y_<t) · (log p(v | x, y_<t) − log q(v | x, y_<t))
    reverse KL   KL(q‖p)_t = sum_v q(v | x, y_<t) · (log q(v | x, y_<t) − log p(v | x, y_<t))
    agreement    A_t       = 1[argmax_v q(v | x, y_<t) = argmax_v p(v | x, y_<t)]

The two KLs are the training losses' own per-token functions (`losses.forward_kl` /
`losses.reverse_kl`: fp32 inside, chunked along T, a wider teacher head sliced to the student's
width and re-normalised over the shared ids), so an evaluated KL is exactly what a KD method
optimises. Per-token outputs are (B, T) and 0 where `mask` is 0; averaging over valid tokens is the
caller's business.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minillm_cli.losses import align_vocab, forward_kl, reverse_kl
from minillm_cli.methods.batching import response_logits


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-token top-1 agreement 1[argmax q = argmax p] (argmax over the student's ids).

    Args:
        student_logits: (B, T, Vq).
        teacher_logits: (B, T, Vp >= Vq).
        mask: (B, T) 1 on valid response positions.

    Returns:
        (B, T) fp32 of 0/1, 0 where `mask` is 0.
    """
    teacher = align_vocab(student_logits, teacher_logits)
    same = (student_logits.argmax(-1) == teacher.argmax(-1)).float()  # (B, T)
    return same * mask.float()


@torch.no_grad()
def divergences(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    chunk_size: int = 128,
    teacher_logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """Forward KL, reverse KL and top-1 agreement of one batch of continuations.

    Args:
        student, teacher: Causal LMs sharing a vocabulary (teacher head may be wider).
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        response_ids, response_mask: (B, T) continuations (whoever sampled them).
        chunk_size: Response positions per fp32 KL computation; bounds the (B, chunk, V)
            temporaries (a 50k vocabulary makes full (B, T, V) fp32 tensors large).
        teacher_logits: (B, T, Vp) the teacher's response logits of this very batch, when the
            caller already has them (the teacher forward is then skipped; `teacher` is unused).

    Returns:
        {"fkl", "rkl", "agree"}: each (B, T) fp32 on the inputs' device, 0 where the mask is 0.
    """
    b = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
         "response_mask": response_mask}
    q_logits = response_logits(student, b)  # (B, T, Vq)
    p_logits = teacher_logits if teacher_logits is not None else response_logits(teacher, b)  # (B, T, Vp)
    p_logits = p_logits.to(q_logits.device)
    mask = response_mask.to(q_logits.device)
    return {
        "fkl": forward_kl(q_logits, p_logits, mask, chunk_size=chunk_size),
        "rkl": reverse_kl(q_logits, p_logits, mask, chunk_size=chunk_size),
        "agree": top1_agreement(q_logits, p_logits, mask),
    }
