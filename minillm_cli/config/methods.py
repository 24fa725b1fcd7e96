"""The `method` section of a recipe: one schema per method, told apart by `method.name`
(docs/algorithm.md §1–5 says what each setting does)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from minillm_cli.config.section import Section


class SftMethod(Section):
    """Supervised fine-tuning: cross-entropy on response tokens only."""

    name: Literal["sft"] = "sft"


class KdMethod(Section):
    """Word-level KD: (1-k)·SFT + k·divergence(teacher, student) on dataset responses."""

    name: Literal["kd"] = "kd"
    kd_ratio: float = Field(0.5, ge=0.0, le=1.0)
    loss: Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd", "jsd"] = "forward_kl"
    skew_alpha: float = Field(0.1, gt=0.0, lt=1.0)
    """Mixing weight of the skew KL losses (DistiLLM uses 0.1)."""
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)


class SeqKdMethod(Section):
    """SeqKD: the teacher answers every training prompt once; the student is fine-tuned on that text."""

    name: Literal["seqkd"] = "seqkd"
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    """Prompts per teacher generation batch."""


class GkdMethod(Section):
    """On-policy token-level distillation: generalized JSD(beta) on student samples w.p. lmbda."""

    name: Literal["gkd"] = "gkd"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """0 = forward KL, 1 = reverse KL (token-level), in between the generalized JSD."""
    lmbda: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a batch uses student-sampled responses instead of the dataset's."""
    max_new_tokens: int = Field(64, ge=1)


class MiniLlmMethod(Section):
    """MiniLLM: reverse-KL policy gradient with its four stabilisers (algorithm.md §1-4)."""

    name: Literal["minillm"] = "minillm"
    teacher_mix: float = Field(0.2, ge=0.0, le=1.0)
    """alpha of teacher-mixed sampling p~ = alpha·p + (1-alpha)·q; 0 = plain student sampling."""
    single_step: bool = True
    """Add the exact per-position reverse KL over the vocabulary (single-step decomposition)."""
    length_norm: bool = True
    """Average (not sum) future rewards: the return at t is divided by the remaining length, as the paper
    and its reference code do. Off gives shorter answers; its reverse KL to the teacher was worse on
    open-ended instruction data and better on the short built-in task (bench/QUALITY.md "Study 3",
    docs/algorithm.md §3)."""
    discounted_norm: bool = False
    """With length_norm: divide the discounted return by the sum of its discount weights (a weighted
    mean of the future rewards) instead of by the remaining length, which with gamma < 1 credits long
    continuations more than stopping (docs/algorithm.md §3)."""
    include_current: bool = True
    """Include the current token's reward in its return (reference default) or only future ones (paper text)."""
    gamma: float = Field(0.95, ge=0.0, le=1.0)
    whiten: bool = True
    """Whiten advantages over the rollout buffer (all ranks)."""
    clip_eps: float | None = Field(0.2, gt=0.0)
    """PPO clip range for the ratio q_theta/p~; null disables clipping."""
    reward_clip: float | None = Field(100.0, gt=0.0)
    num_rollouts: int = Field(32, ge=1)
    """Rollouts collected per buffer (256 at reference scale)."""
    ppo_epochs: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    pt_weight: float = Field(1.0, ge=0.0)
    """lambda_pt of the pre-training loss; used only when data.corpus is set."""
    pt_kd_ratio: float = Field(0.5, ge=0.0, le=1.0)
    """k in L_pt = (1-k)·LM + k·CE(teacher, student)."""
    response_weight: float = Field(0.0, ge=0.0)
    """Beyond the paper (0 = off: the paper's MiniLLM). Adds response_weight · L_resp to every optimizer
    step: GKD's generalized JSD(response_beta) between teacher and student at every token of training
    rows' OWN (dataset) responses, teacher-forced; the off-policy share that GKD's lmbda and DistiLLM's
    mixing give and MiniLLM lacks."""
    response_beta: float = Field(0.5, ge=0.0, le=1.0)
    """beta of that JSD: 0 = forward KL, 1 = reverse KL (token-level), as `gkd`'s beta."""
    xtok_max_mismatch: float = Field(0.05, ge=0.0, le=1.0)
    """With models.cross_tokenizer: the share of a buffer's rollouts whose text does not survive the
    round trip to the teacher's tokenizer (dropped, logged as `xtok_mismatch`) above which the run stops."""


Method = Annotated[
    Union[SftMethod, KdMethod, SeqKdMethod, GkdMethod, MiniLlmMethod], Field(discriminator="name")
]
METHOD_NAMES = ("sft", "kd", "seqkd", "gkd", "minillm")
