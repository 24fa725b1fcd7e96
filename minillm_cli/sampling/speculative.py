"""Speculative sampling of the teacher-mixed target p̃ (Leviathan et al. 2023, Chen et al. 2023), with
the student as the draft model.

After the prefill (both models, first token drawn from p̃ as in lockstep), each round
  1. the student drafts d_1..d_k from q̃ (k one-token forwards: the pending token, d_1, .., d_{k−1});
  2. the teacher runs ONE forward over the same k tokens: p at the k drafted positions;
  3. per row, d_j is accepted with probability min(1, p̃_j(d_j) / q̃_j(d_j)) until the first
     rejection, where a token is drawn from the normalised max(0, p̃_j − q̃_j) instead (for the
     uncut mixture that is α·max(0, p_T − q̃): the acceptance rate is 1 − α·TV ≥ 1 − α).
A row emits its accepted drafts plus the replacement (1 to k tokens per round), so rows advance at
their own pace. Both KV caches receive the same k columns per round; the columns of a row's rejected
drafts stay in the caches as holes that the attention mask hides from then on, and position ids count
real tokens only, so every later forward sees exactly the accepted prefix.

The random stream is consumed in a fixed order per round (the k drafts, then one uniform per draft,
then the replacement), which is what makes a resumed run draw the same rollouts.

Tensor shapes: B rows, A active rows, V student ids, k drafts per round, M = max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minillm_cli.sampling.batch import Rollout
from minillm_cli.sampling.cached_lm import CachedLM
from minillm_cli.sampling.mixture import Settings, draw, residual_probs, teacher_view, temper


def speculative(q_lm: CachedLM, p_lm: CachedLM, prompt_ids: Tensor, prompt_mask: Tensor, s: Settings,
                k: int) -> Rollout:
    """Sample the rollout of `prompt_ids` from p̃ by speculative sampling with `k` drafts per round."""
    out = _Outputs.empty(prompt_ids.shape[0], s, prompt_ids.device)
    active = _prefill(q_lm, p_lm, prompt_ids, prompt_mask, s, out)
    compact = q_lm.can_drop_rows() and p_lm.can_drop_rows()
    while not bool(active.finished.all()):
        if compact and bool(active.finished.any()):
            active = active.drop_finished(q_lm, p_lm)
        kr = min(k, int((s.max_new_tokens - active.emitted(out))[~active.finished].max()))  # no row can use more
        draft = _draft(q_lm, active, s, kr)
        lp_all, lt_all = _verify(p_lm, active, draft, s, out.vocab)
        emitted, n_emit = _accept(draft, lt_all, active, s, out)
        out.record(active, emitted, n_emit, draft.logq, lp_all, lt_all)
        active.advance(emitted, n_emit, s, out)
    return out.rollout(prompt_ids, prompt_mask, s.pad_token_id)


@dataclass
class _Outputs:
    """What the rollout records, per batch row: (B, M) tensors filled as tokens are emitted."""

    response_ids: Tensor
    logq: Tensor
    logp: Tensor
    log_mix: Tensor
    lengths: Tensor
    """(B,) tokens emitted per row."""
    teacher: Tensor | None = None
    """(B, M, V) the teacher's full log-probs, with `keep_teacher_logprobs`."""
    vocab: int = 0
    teacher_calls: int = 0
    row_calls: int = 0
    checked: int = 0
    accepted: int = 0

    @classmethod
    def empty(cls, B: int, s: Settings, device: torch.device) -> _Outputs:
        M = s.max_new_tokens
        zeros = torch.zeros(B, M, dtype=torch.float32, device=device)
        return cls(response_ids=torch.full((B, M), s.pad_token_id, dtype=torch.long, device=device), logq=zeros,
                   logp=zeros.clone(), log_mix=zeros.clone(), lengths=torch.ones(B, dtype=torch.long, device=device))

    def record(self, active: _Active, emitted: Tensor, n_emit: Tensor, lq_all: Tensor, lp_all: Tensor,
               lt_all: Tensor) -> None:
        """Write each row's first `n_emit` of `emitted` (A, kr) at its next response columns."""
        ar = torch.arange(emitted.shape[1], device=emitted.device)
        b_idx, j_idx = (ar < n_emit.unsqueeze(-1)).nonzero(as_tuple=True)
        row, col = active.idx[b_idx], self.lengths[active.idx][b_idx] + j_idx
        tok = emitted[b_idx, j_idx]
        self.response_ids[row, col] = tok
        self.logq[row, col] = lq_all[b_idx, j_idx, tok]
        self.logp[row, col] = lp_all[b_idx, j_idx, tok]
        self.log_mix[row, col] = lt_all[b_idx, j_idx, tok]
        if self.teacher is not None:
            self.teacher[row, col] = lp_all[b_idx, j_idx]

    def rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, pad_token_id: int) -> Rollout:
        M = self.response_ids.shape[1]
        steps = int(self.lengths.max())
        response_mask = (torch.arange(M, device=prompt_ids.device) < self.lengths.unsqueeze(-1)).long()  # (B, M)
        response_ids = self.response_ids.masked_fill(response_mask == 0, pad_token_id)
        return Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids[:, :steps],
            response_mask=response_mask[:, :steps], logq=self.logq[:, :steps], logp=self.logp[:, :steps],
            log_mix=self.log_mix[:, :steps],
            teacher_logprobs=self.teacher[:, :steps] if self.teacher is not None else None,
            teacher_calls=self.teacher_calls, teacher_row_calls=self.row_calls, drafts_checked=self.checked,
            drafts_accepted=self.accepted,
        )


@dataclass
class _Active:
    """The rows still in the KV caches: `idx` (A,) maps them to batch rows. Rows that finish are dropped
    from both caches where the caches allow it; otherwise they stay, marked finished, and emit nothing."""

    idx: Tensor
    finished: Tensor
    """(A,) bool."""
    pending: Tensor
    """(A,) the newest emitted token, not yet in either cache."""
    pos: Tensor
    """(A,) its position id: real tokens before it."""
    mask: Tensor
    """(A, C) attention mask of the cached columns (0 = padding or a rejected draft)."""

    def emitted(self, out: _Outputs) -> Tensor:
        """(A,) tokens each active row has emitted."""
        return out.lengths[self.idx]

    def drop_finished(self, q_lm: CachedLM, p_lm: CachedLM) -> _Active:
        keep = (~self.finished).nonzero().squeeze(-1)  # (A',)
        q_lm.keep_rows(keep)
        p_lm.keep_rows(keep)
        return _Active(self.idx[keep], self.finished[keep], self.pending[keep], self.pos[keep], self.mask[keep])

    def advance(self, emitted: Tensor, n_emit: Tensor, s: Settings, out: _Outputs) -> None:
        """After a round: the caches hold its kr columns, the first n_emit of a row being its accepted
        prefix (the pending token, then the emitted tokens but the last); the rest become holes."""
        kr = emitted.shape[1]
        ar = torch.arange(kr, device=emitted.device)
        kept = (ar < n_emit.unsqueeze(-1)).long()  # (A, kr)
        self.mask = torch.cat([self.mask, kept], dim=1)
        rows = torch.arange(emitted.shape[0], device=emitted.device)
        last = emitted[rows, (n_emit - 1).clamp(min=0)]
        self.pending = torch.where(n_emit > 0, last, self.pending)
        self.pos = self.pos + n_emit
        out.lengths[self.idx] = out.lengths[self.idx] + n_emit
        hit_eos = (torch.isin(emitted, s.eos) & kept.bool()).any(-1)
        self.finished = self.finished | hit_eos | (out.lengths[self.idx] >= s.max_new_tokens)


def _prefill(q_lm: CachedLM, p_lm: CachedLM, prompt_ids: Tensor, prompt_mask: Tensor, s: Settings,
             out: _Outputs) -> _Active:
    """Both models over the prompts, and the first token drawn from p̃ exactly as lockstep draws it."""
    device = prompt_ids.device
    B = prompt_ids.shape[0]
    rows = torch.arange(B, device=device)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    logq_t = temper(q_lm.step(prompt_ids, prompt_mask, position_ids), s.temperature)  # (B, V)
    out.vocab = logq_t.shape[-1]
    logp = teacher_view(p_lm.step(prompt_ids, prompt_mask, position_ids), out.vocab)  # (B, V)
    log_mix = s.target(logq_t, logp)
    token = draw(log_mix.exp(), s.generator)  # (B,)
    out.response_ids[:, 0] = token
    out.logq[:, 0], out.logp[:, 0], out.log_mix[:, 0] = logq_t[rows, token], logp[rows, token], log_mix[rows, token]
    if s.keep_teacher_logprobs:
        out.teacher = logp.new_zeros(B, s.max_new_tokens, out.vocab)
        out.teacher[:, 0] = logp
    out.teacher_calls, out.row_calls = 1, B
    finished = torch.isin(token, s.eos) | torch.tensor(s.max_new_tokens == 1, device=device)  # (B,)
    return _Active(idx=rows, finished=finished, pending=token, pos=prompt_mask.sum(-1), mask=prompt_mask)


@dataclass
class _Draft:
    inputs: Tensor
    """(A, kr) the tokens fed to the student: pending, d_1 .. d_{kr−1}."""
    tokens: Tensor
    """(A, kr) the drafts d_1 .. d_kr."""
    logq: Tensor
    """(A, kr, V) log q̃ at the drafted positions."""


def _draft(q_lm: CachedLM, active: _Active, s: Settings, kr: int) -> _Draft:
    """kr tokens from the tempered student, one forward each; all but the last are fed."""
    A = active.idx.numel()
    fed, drafts, draft_logq = [], [], []
    current = active.pending
    for j in range(kr):
        step_mask = torch.cat([active.mask, active.mask.new_ones(A, j + 1)], dim=1)  # (A, C + j + 1)
        lq = temper(q_lm.step(current.unsqueeze(-1), step_mask, (active.pos + j).unsqueeze(-1)), s.temperature)
        fed.append(current)
        current = draw(lq.exp(), s.generator)  # (A,) d_{j+1}
        drafts.append(current)
        draft_logq.append(lq)
    return _Draft(torch.stack(fed, dim=1), torch.stack(drafts, dim=1), torch.stack(draft_logq, dim=1))


def _verify(p_lm: CachedLM, active: _Active, draft: _Draft, s: Settings, vocab: int) -> tuple[Tensor, Tensor]:
    """The teacher over the round's kr columns in one forward: (log p, log p̃), each (A, kr, V)."""
    A, kr = draft.inputs.shape
    ar = torch.arange(kr, device=draft.inputs.device)
    round_mask = torch.cat([active.mask, active.mask.new_ones(A, kr)], dim=1)  # (A, C + kr)
    lp_all = teacher_view(p_lm.step_all(draft.inputs, round_mask, active.pos.unsqueeze(-1) + ar), vocab)
    return lp_all, s.target(draft.logq, lp_all)


def _accept(draft: _Draft, lt_all: Tensor, active: _Active, s: Settings, out: _Outputs) -> tuple[Tensor, Tensor]:
    """Accept the drafts while u < p̃(d)/q̃(d), replace the first rejected one by a draw from the residual,
    and cut at the first EOS and at the token budget.

    Returns:
        `(emitted, n_emit)`: (A, kr) the accepted drafts then the replacement, and (A,) how many of
        them each row emits (0 for finished rows).
    """
    d, lq_all = draft.tokens, draft.logq
    A, kr = d.shape
    rows, ar = torch.arange(A, device=d.device), torch.arange(kr, device=d.device)
    alive = ~active.finished
    out.teacher_calls += 1
    out.row_calls += int(alive.sum())
    # in fp64: the ratio is ≥ 1 − α for the mixture, never tiny
    ratio = (lt_all.gather(-1, d.unsqueeze(-1)) - lq_all.gather(-1, d.unsqueeze(-1))).squeeze(-1).double().exp()
    u = torch.rand(A, kr, dtype=torch.float64, device=d.device, generator=s.generator)
    n_acc = (u < ratio).long().cumprod(dim=-1).sum(dim=-1)  # (A,) leading accepted drafts
    rejected = n_acc < kr
    at = n_acc.clamp(max=kr - 1)  # (A,) the rejected position (ignored where all were accepted)
    replacement = draw(residual_probs(lt_all[rows, at], lq_all[rows, at]), s.generator)  # (A,)
    emitted = d.clone()
    emitted[rows, at] = torch.where(rejected, replacement, d[rows, at])
    n_emit = torch.where(rejected, n_acc + 1, kr)  # (A,)
    out.checked += int(n_emit[alive].sum())
    out.accepted += int(n_acc[alive].sum())
    is_eos = torch.isin(emitted, s.eos) & (ar < n_emit.unsqueeze(-1))  # (A, kr)
    through_eos = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, kr)  # (A,)
    n_emit = torch.minimum(torch.minimum(n_emit, through_eos), s.max_new_tokens - active.emitted(out))
    return emitted, n_emit.masked_fill(active.finished, 0)
