"""MiniLLM: reverse-KL distillation by policy gradient (Gu et al., ICLR 2024; algorithm.md §1-4).

One buffer cycle:
  1. Rollout (no grad): `num_rollouts` prompts per buffer (split over ranks), responses drawn from the
     teacher-mixed p~ = alpha·p + (1-alpha)·q_old by our KV-cached sampler, which records per token
     logq_old, log p~ (and the teacher's log p when it already runs for mixing).
  2. Teacher scoring (no grad, once per buffer, not per PPO epoch): one teacher-forced forward over
     prompt+response gives the teacher's next-token logits at every response position (for the
     single-step term) and log p of the sampled tokens (for the reward). Skipped when the buffer feeds
     one optimizer step only and the rollout was teacher-mixed: the rollout's teacher log-probs are used.
  3. Rewards r_t = log p - log q_old (clipped to ±reward_clip), length-normalised discounted returns,
     whitened over the buffer of all ranks -> advantages A_t (policy_gradient.advantages).
  4. `ppo_epochs` shuffled passes over the buffer; each optimizer step takes `batch_size × grad_accum`
     rollouts per rank and minimises  L = L_pg + L_reg (+ pt_weight · L_pt with a corpus), where
     L_pg = Σ m·max(-A·rho, -A·clip(rho, 1±eps)) / Σ m with rho = q_theta/p~, and
     L_reg = Σ m·KL(q_theta(·|ctx) ‖ p(·|ctx)) / Σ m over the vocabulary (fp32, chunked).
Every stabiliser can be switched off in the recipe (teacher_mix 0, single_step false, length_norm
false, clip_eps null, whiten false) for the paper's ablations.

Variant beyond the paper (`method.response_weight` > 0; off by default, and then nothing below runs
and no extra examples are drawn): every optimizer step also draws `batch_size × grad_accum` training
rows per rank from the same data stream and adds response_weight · L_resp, with L_resp GKD's token-mean
generalized JSD(`response_beta`) between teacher and student (untempered, i.e. the saved student) at
every token of those rows' own dataset responses, teacher-forced. This gives MiniLLM the off-policy
share that GKD's lmbda and DistiLLM's mixing have. Logged as `resp_kd_loss`.

Sampler settings. `rollout.temperature` T ≠ 1 makes the objective the TEMPERED student (as in the
reference code): q̃_θ = softmax(z_θ / T) replaces q_θ everywhere — in the rollout's log q_old and
mixture (the teacher's share of p~ is tempered too, see `rollout`), the reward log p − log q̃_old, the
ratio q̃_θ / p~ and the single-step term KL(q̃_θ ‖ p); the teacher p stays at temperature 1. The
estimator is then that of ∇KL[q̃_θ ‖ p] (tests/test_minillm_exact.py checks it exactly), and the
student at T = 1 is what is saved. `rollout.top_k` / `rollout.top_p` are rejected (UserError naming
the key): ids outside the cut are never drawn, so they would get no gradient, and the cut set of
every token would have to be stored with the buffer (N × T × V) and carried through resume.

Logged per buffer: `rkl` estimates the sequence-level KL[q̃_old ‖ p] = E_q̃[Σ_t log q̃_old − log p]
from the p~ samples by self-normalised importance weighting with the sequence weight
W = Π_t q̃_old(y_t) / p~(y_t) (plain mean when α = 0); `rkl_ess` is the weights' effective sample size
as a fraction of the buffer (1 = every sample counts fully). `reward` is the token mean of r_t over the
sampled tokens, as sampled (not a KL estimate).

Exact resume: the buffer's small tensors (tokens, masks, logq_old, log p~, advantages) and the
position in the PPO schedule are saved; the teacher logits are recomputed on resume by the same
deterministic forward over the same row chunks, so nothing of size N×T×V goes into checkpoints.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from minillm_cli.config.methods import MiniLlmMethod
from minillm_cli.config.validation import check_minillm_sampler as check_sampler
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import UserError
from minillm_cli.losses import divergences, logprobs, objectives, policy_gradient
from minillm_cli.methods.batching import (
    TokenMean,
    even_passes,
    jsd_backward,
    length_groups,
    response_logits,
    take_group,
)
from minillm_cli.methods.context import Ctx, check_stop
from minillm_cli.models.loading import eos_ids

SCORE_ROWS = 8
"""Rollouts per teacher forward of `_score_teacher`: its logits and activations for 8 rows at a time
(the (N, T, V) result is the only full-size tensor)."""
BUFFER_KEYS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logq", "log_mix", "logp", "adv", "reward",
               "index")


def _pad_cat(tensors: list[torch.Tensor], left: bool, value: float) -> torch.Tensor:
    """Concatenate (b_i, L_i, ...) tensors along rows, padding every one to max L (left or right)."""
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = width - t.shape[1]
        if pad:
            filler = torch.full((t.shape[0], pad, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
            t = torch.cat([filler, t] if left else [t, filler], dim=1)
        out.append(t)
    return torch.cat(out, dim=0)


class MiniLlmStepper:
    """Collects rollout buffers and takes PPO-style optimizer steps over them."""

    needs_teacher: ClassVar[bool] = True

    def __init__(self, ctx: Ctx) -> None:
        assert ctx.teacher is not None  # guaranteed by prepare.resolve_models for teacher methods
        assert isinstance(ctx.recipe.method, MiniLlmMethod)
        self.ctx = ctx
        self.teacher = ctx.teacher
        self.cfg = ctx.recipe.method
        tr = ctx.recipe.train
        self.per_step = tr.batch_size * tr.grad_accum  # rollouts per optimizer step per rank
        self.local_rollouts = max(self.cfg.num_rollouts // ctx.world, 1)
        if self.local_rollouts < self.per_step:
            raise UserError(
                f"method.num_rollouts: {self.cfg.num_rollouts} rollouts cannot feed one optimizer step of "
                f"train.batch_size × train.grad_accum × processes = {self.per_step * ctx.world}")
        check_sampler(ctx.recipe.rollout)
        self.temperature = ctx.recipe.rollout.temperature
        """T of `rollout.temperature`: the student's logits are divided by it in every log q̃_θ."""
        self.buffer: dict[str, torch.Tensor] | None = None
        self.teacher_logits: torch.Tensor | None = None  # (N, T, V), recomputable from the buffer
        self.schedule: list[list[int]] = []  # row indices of each remaining optimizer step of this buffer
        self.corpus_pos = 0
        self.buffer_stats: dict[str, float] = {}
        self.xtok_mismatch = 0.0
        """models.cross_tokenizer: share of the last buffer's rollouts dropped (text not round-tripped)."""

    # ------------------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def _collect(self) -> None:
        """Fill a new buffer (steps 1-3 of the module docstring) and plan its PPO schedule."""
        from minillm_cli.sampling.rollout import sample

        ctx, cfg, r = self.ctx, self.cfg, self.ctx.recipe.rollout
        t0 = time.time()
        student = ctx.sampling_model()  # a full local copy when the student is sharded
        examples = ctx.next_examples(self.local_rollouts)
        # A teacher-mixed rollout runs the teacher at every position anyway. When this buffer feeds a
        # single optimizer step (no checkpoint can fall inside it, so nothing has to be recomputed on
        # resume), its log-probs serve as the reward's log p and the single-step term's teacher
        # logits, and the separate teacher forward of `_score_teacher` is skipped.
        keep = cfg.teacher_mix > 0 and cfg.ppo_epochs == 1 and self.local_rollouts <= self.per_step
        parts: list[dict[str, Any]] = []  # "logp", "teacher" are None unless kept
        calls = checked = accepted = 0  # teacher forwards per row, speculative drafts checked / accepted
        eos = eos_ids(student, ctx.tokenizer)  # what ends a response: as `minillm eval` generates
        for i in range(0, len(examples), r.batch_size):
            check_stop(ctx)
            ids, mask = data_mod.collate_prompts(examples[i : i + r.batch_size], ctx.tokenizer.pad_token_id)
            roll = sample(
                student, ids.to(ctx.device), mask.to(ctx.device),
                teacher=self.teacher if cfg.teacher_mix > 0 else None, alpha=cfg.teacher_mix,
                max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                pad_token_id=ctx.tokenizer.pad_token_id, temperature=r.temperature, top_k=r.top_k,
                top_p=r.top_p, generator=ctx.gen, keep_teacher_logprobs=keep and cfg.single_step,
                speculative_tokens=r.speculative_tokens,
            )
            calls += roll.teacher_row_calls
            checked += roll.drafts_checked
            accepted += roll.drafts_accepted
            parts.append({"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask,
                          "response_ids": roll.response_ids, "response_mask": roll.response_mask,
                          "logq": roll.logq, "log_mix": roll.log_mix, "logp": roll.logp,
                          "teacher": roll.teacher_logprobs})
        pad = ctx.tokenizer.pad_token_id
        buf = {
            "prompt_ids": _pad_cat([p["prompt_ids"] for p in parts], left=True, value=pad),
            "prompt_mask": _pad_cat([p["prompt_mask"] for p in parts], left=True, value=0),
            "response_ids": _pad_cat([p["response_ids"] for p in parts], left=False, value=pad),
            "response_mask": _pad_cat([p["response_mask"] for p in parts], left=False, value=0),
            "logq": _pad_cat([p["logq"] for p in parts], left=False, value=0.0),
            "log_mix": _pad_cat([p["log_mix"] for p in parts], left=False, value=0.0),
        }
        buf["index"] = torch.tensor([e.index for e in examples], dtype=torch.long, device=ctx.device)
        t_roll = time.time() - t0
        if ctx.teacher_tokenizer is not None:  # models.cross_tokenizer: the teacher scores the text (xtok.py)
            buf["logp"] = self._score_text(buf)
            self.teacher_logits = None
        elif keep:
            buf["logp"] = _pad_cat([p["logp"] for p in parts], left=False, value=0.0)
            self.teacher_logits = (_pad_cat([p["teacher"] for p in parts], left=False, value=0.0)
                                   if cfg.single_step else None)  # (N, T, V) teacher log-probs
        else:
            self.teacher_logits, buf["logp"] = self._score_teacher(buf)
        mask = buf["response_mask"].float()
        reward = (buf["logp"] - buf["logq"]) * mask  # (N, T): per-token log p - log q_old
        if cfg.reward_clip is not None:
            reward = reward.clamp(-cfg.reward_clip, cfg.reward_clip)
        buf["reward"] = reward
        buf["adv"] = policy_gradient.advantages(
            reward, mask, gamma=cfg.gamma, include_current=cfg.include_current, length_norm=cfg.length_norm,
            discounted_norm=cfg.discounted_norm, whiten=cfg.whiten, reduce_fn=ctx.global_sum,
        )
        self.buffer = buf
        # PPO schedule: ppo_epochs shuffled passes; each step takes `per_step` rows (last one may be short).
        n = buf["response_ids"].shape[0]
        self.schedule = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=ctx.gen, device=ctx.device).tolist()
            self.schedule += [order[i : i + self.per_step] for i in range(0, n, self.per_step)]
        gen_tokens = float(mask.sum())
        rkl, ess = policy_gradient.sequence_rkl(buf["logq"], buf["logp"], buf["log_mix"], mask)
        # rollouts cut by method.max_new_tokens: scored as if they had ended there (no stop decision)
        last = buf["response_ids"].gather(1, (mask.sum(-1).long() - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
        cut = ~torch.isin(last, torch.tensor(eos, device=last.device)) & (mask.sum(-1) > 0)
        self.buffer_stats = {
            "reward": float(reward.sum() / mask.sum().clamp_min(1)),
            "rkl": rkl,
            "rkl_ess": ess,
            "resp_len": gen_tokens / n,
            "trunc_frac": float(cut.float().mean()),
            "rollout_time": t_roll,
            "score_time": time.time() - t0 - t_roll,
            "gen_tok_per_s": gen_tokens / max(t_roll, 1e-9),
        }
        if ctx.teacher_tokenizer is not None:
            self.buffer_stats["xtok_mismatch"] = self.xtok_mismatch
        if cfg.teacher_mix > 0:
            # Local to this rank: teacher forwards per generated token (1 in lockstep) and the
            # share of speculative drafts accepted (≥ 1 − teacher_mix).
            self.buffer_stats["teacher_calls_per_token"] = calls / max(gen_tokens, 1.0)
            if checked:
                self.buffer_stats["draft_accept"] = accepted / checked

    def _score_text(self, buf: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-tokenizer: the teacher's log-probs of the responses' text per student token; rows whose
        text does not survive the round trip leave the buffer's losses (mask zeroed) and are counted."""
        from minillm_cli.methods.xtok import score_text

        scores = score_text(self.ctx, buf, self.ctx.recipe.rollout.batch_size)
        share = float(scores.dropped.float().mean())
        self.xtok_mismatch = share
        if share > self.cfg.xtok_max_mismatch:
            raise UserError(f"method.xtok_max_mismatch: {share:.0%} of this buffer's rollouts do not survive the "
                            f"round trip to the teacher's tokenizer (allowed {self.cfg.xtok_max_mismatch:.0%}), e.g. "
                            f"{scores.problems[0]}")
        buf["response_mask"][scores.dropped] = 0
        return scores.logp

    @torch.no_grad()
    def _score_teacher(self, buf: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits at every response position (N, T, V) and log p of the sampled tokens (N, T),
        in fixed row chunks so that a resume recomputes exactly the same numbers."""
        ctx = self.ctx
        rows = min(ctx.recipe.rollout.batch_size, SCORE_ROWS)
        N, T = buf["response_ids"].shape
        # Filled in place, chunk by chunk: a torch.cat of the parts would hold (N, T, V) twice at its peak.
        logits: torch.Tensor | None = None  # (N, T, V) in the teacher's dtype
        logp_all = torch.zeros(N, T, dtype=torch.float32, device=ctx.device)
        for i in range(0, N, rows):
            b = {k: buf[k][i : i + rows] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}
            t_logits = response_logits(self.teacher, b, vocab=ctx.vocab)  # (b, T, V)
            logp = logprobs.token_logprobs(t_logits, b["response_ids"], chunk_size=ctx.recipe.train.chunk_size)
            if logits is None:
                logits = t_logits.new_empty(N, T, t_logits.shape[-1])
            logits[i : i + rows] = t_logits
            logp_all[i : i + rows] = logp * b["response_mask"]
            del t_logits
        assert logits is not None  # N >= 1 rollouts
        return logits, logp_all

    # ---------------------------------------------------------------------------- training
    def step(self) -> dict[str, float]:
        ctx, cfg, tr = self.ctx, self.cfg, self.ctx.recipe.train
        fresh = not self.schedule
        if fresh:
            self._collect()
        assert self.buffer is not None and (self.teacher_logits is not None or not cfg.single_step)
        t0 = time.time()
        rows = self.schedule.pop(0)
        buf = self.buffer
        micro = [rows[i : i + tr.batch_size] for i in range(0, len(rows), tr.batch_size)]
        mean = TokenMean(ctx, buf["response_mask"][rows].sum())
        sums = {k: torch.zeros((), device=ctx.device) for k in ("pg", "reg", "clipped")}
        # Extra terms after the PG/reg micro-batches; only the step's very last backward syncs gradients.
        use_pt = bool(ctx.corpus) and cfg.pt_weight > 0
        use_resp = cfg.response_weight > 0
        # Rows of similar length go through the student together, each group with only the padding it
        # needs (see `length_groups`): same per-token losses, less padded compute, smaller activations.
        groups = []
        for idx in micro:
            index = torch.tensor(idx, device=ctx.device)
            groups += [(index[g], p, t) for g, p, t in
                       length_groups(buf["prompt_mask"][index], buf["response_mask"][index])]
        passes = even_passes(ctx, groups)  # as many passes as the busiest rank (fillers weigh 0)
        for j, ((index, P, T), real) in enumerate(passes):
            check_stop(ctx)
            pg_sum, reg_sum, clipped = self.group_losses(index, P, T)
            loss_sum = pg_sum + reg_sum
            if real:
                sums["pg"] += pg_sum.detach()
                sums["clipped"] += clipped
                sums["reg"] += reg_sum.detach()
            else:
                loss_sum = loss_sum * 0.0
            last = j == len(passes) - 1 and not (use_pt or use_resp)
            mean.backward(loss_sum, last=last)
        pg, reg = mean.value(sums["pg"]), mean.value(sums["reg"])
        metrics: dict[str, float] = {"pg_loss": pg, "reg_loss": reg, "clip_frac": mean.value(sums["clipped"])}
        if ctx.world > 1:  # zero-weight passes this rank ran to keep step with the others (logged: rank mean)
            metrics["filler_passes"] = len(passes) - len(groups)
        loss = pg + reg
        if use_pt:
            pt = self._pt_step(last=not use_resp)
            metrics["pt_loss"] = pt
            loss += cfg.pt_weight * pt
        if use_resp:
            resp = self._response_step()
            metrics["resp_kd_loss"] = resp
            loss += cfg.response_weight * resp
        train_time = time.time() - t0
        metrics.update(self.buffer_stats if fresh else {k: v for k, v in self.buffer_stats.items()
                                                        if k in ("reward", "rkl", "rkl_ess", "resp_len", "trunc_frac")})
        metrics.update(loss=loss, train_time=train_time, tok_per_s=mean.tokens / max(train_time, 1e-9),
                       new_buffer=int(fresh))
        return metrics

    def group_losses(self, index: torch.Tensor, P: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token sums of L_pg and L_reg (0 without single_step) over one length group of buffer rows,
        with the student's graph, and its number of clipped tokens (no graph).

        `index`: (B,) buffer rows; P, T: the group's prompt and response widths (`length_groups`).
        Used by `step` and by diagnostics that need the two terms' gradients apart."""
        ctx, cfg, tr, buf = self.ctx, self.cfg, self.ctx.recipe.train, self.buffer
        assert buf is not None
        b = take_group(buf, index, P, T)
        m = b["response_mask"].float()  # (B, T)
        logits = response_logits(ctx.student, b)  # (B, T, V)
        if self.temperature != 1.0:
            logits = logits / self.temperature  # the tempered student q̃_θ (module docstring)
        logq_new = logprobs.token_logprobs(logits, b["response_ids"], chunk_size=tr.chunk_size)  # (B, T)
        logq_old = buf["logq"][index, :T]
        log_w = logq_old - buf["log_mix"][index, :T]  # log(q_old / p~): the importance weight
        pg_tok, clip_frac = policy_gradient.policy_loss(logq_new, logq_old, log_w, buf["adv"][index, :T], m,
                                                        clip_eps=cfg.clip_eps)
        pg_sum = (pg_tok * m).sum()
        reg_sum = torch.zeros((), device=pg_sum.device)
        if cfg.single_step:
            assert self.teacher_logits is not None  # set with the buffer whenever single_step is on
            reg_tok = divergences.reverse_kl(logits, self.teacher_logits[index, :T], m, chunk_size=tr.chunk_size)
            reg_sum = (reg_tok * m).sum()
        return pg_sum, reg_sum, clip_frac.detach() * m.sum()

    def _pt_step(self, last: bool = True) -> float:
        """Pre-training term on `grad_accum` corpus micro-batches: (1-k)·LM + k·CE(teacher, student).

        `last`: this term's final backward is the step's last one (gradient sync)."""
        ctx, cfg, tr = self.ctx, self.cfg, self.ctx.recipe.train
        assert ctx.corpus is not None
        n = len(ctx.corpus)
        batches = []
        for _ in range(tr.grad_accum):
            idx = data_mod.take_indices(n, tr.seed + 1, self.corpus_pos, tr.batch_size * ctx.world)
            self.corpus_pos += len(idx)
            mine = idx[ctx.rank :: ctx.world]
            batches.append({k: v.to(ctx.device) for k, v in
                            data_mod.collate_corpus([ctx.corpus[i] for i in mine], ctx.tokenizer.pad_token_id).items()})
        mean = TokenMean(ctx, sum((b["labels"][:, 1:] != -100).sum() for b in batches))
        total = torch.zeros((), device=ctx.device)
        for j, b in enumerate(batches):
            logits = ctx.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, L, V)
            with torch.no_grad():
                t_logits = self.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                t_logits = t_logits[..., : logits.shape[-1]]
            pt_sum, _ = objectives.pt_loss(logits, b["labels"], t_logits, kd_ratio=cfg.pt_kd_ratio,
                                       chunk_size=tr.chunk_size)
            mean.backward(pt_sum, last=last and j == len(batches) - 1, weight=cfg.pt_weight)
            total += pt_sum.detach()
        return mean.value(total)

    def _response_step(self) -> float:
        """The variant's term (module docstring): token-mean generalized JSD(response_beta) between
        teacher and student on `batch_size × grad_accum` dataset rows per rank, teacher-forced, backward
        with weight `response_weight`; always the step's last backward. Returns the global token mean."""
        ctx, cfg, tr = self.ctx, self.cfg, self.ctx.recipe.train
        examples = ctx.next_examples(self.per_step)
        batches = [{k: v.to(ctx.device) for k, v in
                    data_mod.collate_pairs(examples[i : i + tr.batch_size], ctx.tokenizer.pad_token_id).items()}
                   for i in range(0, len(examples), tr.batch_size)]
        mean, total = jsd_backward(ctx, self.teacher, batches, cfg.response_beta, cfg.response_weight)
        return mean.value(total)

    # ------------------------------------------------------------------------------ resume
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"buf.{k}": v.detach().cpu() for k, v in (self.buffer or {}).items()}
        return {"schedule": [list(s) for s in self.schedule], "corpus_pos": self.corpus_pos, "buffer_stats": dict(self.buffer_stats)}, tensors

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.schedule = [list(s) for s in state.get("schedule", [])]
        self.corpus_pos = int(state.get("corpus_pos", 0))
        self.buffer_stats = dict(state.get("buffer_stats", {}))
        buf = {k[4:]: v.to(self.ctx.device) for k, v in tensors.items() if k.startswith("buf.")}
        if self.schedule and buf:
            self.buffer = buf
            if self.cfg.single_step:  # the only thing not saved with the buffer: (N, T, V) is too large
                self.teacher_logits, _ = self._score_teacher(buf)
