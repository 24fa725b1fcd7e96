"""The recipe schema: a typed, validated description of one run.

A recipe has one section per concern. Every field is documented here; unknown keys are errors.
`validate()` turns a nested dict into a `Recipe`, naming the dotted key of every problem. Reading
YAML files, `key=value` overrides and flags, and finding the shipped recipes live in
`config.loading` (`load_recipe()` is the entry point of a run). The base of every section is
`config.section.Section`; the method sections are in `config.methods`.

This module must stay light: it is imported by the CLI, which must not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from minillm_cli.config.methods import Method, MiniLlmMethod
from minillm_cli.config.section import Section


def _home_exists(value: str | None) -> str | None:
    """A path that starts with `~user` must name a user of this machine (else no path can be made of it)."""
    if isinstance(value, str) and value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            raise ValueError(f"{value.split('/')[0]} is the home directory of no user here") from None
    return value


# --------------------------------------------------------------------------------------- models
class StudentInit(Section):
    """How to build the student when `models.student` is not given."""

    from_: Literal["teacher", "fresh"] = Field("teacher", alias="from")
    """`teacher`: a layer-pruned copy of the teacher; `fresh`: a smaller random model of its architecture."""
    layers: list[int] | None = None
    """Teacher layer indices to keep (from: teacher)."""
    keep: int | None = Field(None, ge=1)
    """Keep this many evenly spaced teacher layers, first and last included (from: teacher)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Config overrides for `from: fresh`, e.g. {num_hidden_layers: 4, hidden_size: 256}."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_choice(self) -> "StudentInit":
        if self.from_ == "teacher" and (self.layers is None) == (self.keep is None):
            raise ValueError("with from: teacher give exactly one of `layers` or `keep`")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be non-negative indices, got {self.layers}")
        return self


class LoraConfig(Section):
    """LoRA adapters through peft (off by default: full fine-tuning)."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ModelsConfig(Section):
    """Teacher and student: a local directory, a .gguf file, a short alias or a hub id."""

    teacher: str | None = None
    """The frozen teacher. Required by every distillation method."""
    student: str | None = None
    """The student to train. If absent, `student_init` builds one from the teacher."""
    student_init: StudentInit | None = None
    """How to build the student from the teacher when `student` is not given."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: fp32 on CPU, bf16 on GPUs that support it."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1 ..."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust it."""
    allow_pickle: bool = False
    """Load pickle (.bin) weights. Off: only safetensors are loaded."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    trainable_layers: int | None = Field(None, ge=1)
    """Train only the top N transformer blocks and the final norm (embeddings, output head and lower
    blocks frozen; the backward pass then stops at block L-N). None trains everything."""
    teacher_placement: str = "shared"
    """Where the frozen teacher lives in each training process:
    `shared`: a full copy on the student's device (every process holds one);
    `sharded`: sharded over the processes like the student (FSDP launches only; its forward passes are
    collective, so not with teacher sampling: seqkd, minillm with teacher_mix > 0);
    `cpu`: weights and forward passes on the CPU, logits copied to the student's device (frees
    accelerator memory, slow for large teachers);
    `device:N`: a full copy on local accelerator N (single-process runs), logits copied back."""
    cross_tokenizer: bool = False
    """Teacher and student have different tokenizers (docs/algorithm.md §7): the teacher scores the
    student's TEXT, re-tokenised with its own tokenizer and prompt template. Runs with `minillm`
    (teacher_mix 0, single_step false, no id-level extra terms), `sft` and `seqkd`; off, a tokenizer
    mismatch is an error."""

    @field_validator("teacher_placement")
    @classmethod
    def _placement(cls, v: str) -> str:
        if v in ("shared", "sharded", "cpu") or (v.startswith("device:") and v[7:].isdigit()):
            return v
        raise ValueError(f"must be shared, sharded, cpu or device:N, got {v!r}")

    @model_validator(mode="after")
    def _student_xor_init(self) -> "ModelsConfig":
        if self.student is not None and self.student_init is not None:
            raise ValueError("give either `student` or `student_init`, not both")
        return self


# ----------------------------------------------------------------------------------------- data

    _homes = field_validator("teacher", "student")(classmethod(lambda cls, v: _home_exists(v)))


class DataConfig(Section):
    """Instruction data (train/dev), its format and tokenisation limits; optional plain-text corpus."""

    train: str | None = None
    """jsonl/json/csv/parquet file or a hub dataset id (`hub:org/name` or `org/name`)."""
    dev: str | None = None
    """Held-out file for dev loss / dev metrics. If absent, `dev_fraction` of train is held out."""
    dev_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    dev_max_samples: int = Field(64, ge=1)
    """Cap on dev examples used for the periodic dev loss / dev eval (they cost time)."""
    split: str = "train"
    """Split name for hub datasets."""
    format: Literal["auto", "alpaca", "dolly", "prompt_response", "messages"] = "auto"
    """Row format; auto detects it from the columns of the first row."""
    template: Literal["auto", "chat", "instruction"] = "auto"
    """Prompt rendering: the model's chat template (chat), the paper's instruction template
    (instruction), or chat when the tokenizer has one (auto)."""
    system_prompt: str | None = None
    """A system message put before every chat-template prompt (None: the template's own default;
    "" an empty one). Ignored by the instruction template."""
    max_prompt_tokens: int = Field(256, ge=1)
    max_total_tokens: int = Field(512, ge=2)
    overlong: Literal["drop", "truncate"] = "truncate"
    """Prompts over max_prompt_tokens: drop the row, or keep the LAST max_prompt_tokens tokens
    (the end of a prompt holds the question and the assistant header). Responses are cut to fit
    max_total_tokens either way."""
    max_train_samples: int | None = Field(None, ge=1)
    corpus: str | None = None
    """Plain-text file (one document per line) for the pre-training loss of MiniLLM. Optional."""
    corpus_max_tokens: int = Field(256, ge=8)
    teacher_cache: str | None = None
    """Directory written by `minillm teacher-cache`: `method: kd` then trains from the teacher's cached
    top-k log-probs (a sparse divergence, README "Teacher cache"), `method: seqkd` from its cached
    answers (`teacher-cache --answers`); neither loads the teacher. The cache must have been built from
    this data, template, tokenizer and max lengths (and, for answers, sampler settings): checked before
    training."""

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfig":
        if self.max_prompt_tokens >= self.max_total_tokens:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must be < max_total_tokens ({self.max_total_tokens})"
            )
        return self

    _homes = field_validator("train", "dev", "corpus", "teacher_cache")(classmethod(lambda cls, v: _home_exists(v)))


# ------------------------------------------------------------------------------ rollout / optim
class RolloutConfig(Section):
    """Sampling settings of on-policy rollouts (MiniLLM, GKD) and SeqKD generation."""

    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    """0 = no top-k filtering."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    """Prompts sampled together."""
    speculative_tokens: int = Field(5, ge=0, le=64)
    """Teacher-mixed sampling (MiniLLM's teacher_mix > 0): the student drafts this many tokens, the
    teacher checks them in one forward and each is accepted with probability min(1, p̃/q̃) — exact
    speculative sampling of p̃, ≥ 1 − teacher_mix of the drafts accepted. 0 = one teacher forward per
    token (lockstep). The samples have the same distribution either way, not the same draws. At most
    64 (a run of k accepted drafts has probability ≥ (1 − teacher_mix)^k, so long rounds mostly cache
    drafts that are cut), and never more than max_new_tokens − 1 per round."""


class OptimConfig(Section):
    """AdamW with warm-up and a cosine or constant schedule."""

    lr: float = Field(5e-6, gt=0.0)
    weight_decay: float = Field(1e-6, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Max global gradient norm; null disables clipping."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {list(v)}")
        return v


class TrainConfig(Section):
    """Loop length, batch shape, cadence and reproducibility."""

    max_steps: int = Field(100, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (global batch = batch_size × grad_accum × processes)."""
    seed: int = 42
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Keep the newest N step directories."""
    dev_loss_every: int = Field(0, ge=0)
    """Compute the dev loss every N steps (0: never during training)."""
    chunk_size: int = Field(128, ge=1)
    """Positions per chunk when a divergence runs over the vocabulary (bounds peak memory)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(default_factory=list)
    """Experiment trackers (accelerate's), any subset, each once; each is an optional extra (`minillm[tensorboard]`)."""
    max_bad_steps: int = Field(5, ge=1)
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads (default: torch's choice)."""

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, v: list[str]) -> list[str]:
        repeated = sorted({name for name in v if v.count(name) > 1})
        if repeated:
            raise ValueError(f"each tracker may be named once; {', '.join(repeated)} is repeated")
        return v


class EvalConfig(Section):
    """Evaluation settings: defaults reproduce the paper's protocol (algorithm.md §6)."""

    every: int = Field(0, ge=0)
    """Evaluate on the dev split every N training steps (single seed; logged as dev numbers). 0 = off."""
    metrics: list[str] = Field(default_factory=lambda: ["rougeL", "loss"])
    seeds: list[int] = Field(default_factory=lambda: [10, 20, 30, 40, 50])
    greedy: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    no_repeat_ngram_size: int = Field(6, ge=0)
    system_prompt: str | None = None
    """System message for chat-template prompts; use the one the model was trained with."""
    max_prompt_tokens: int = Field(256, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    max_samples: int | None = Field(None, ge=1)


class OutputConfig(Section):
    """Where the run goes."""

    dir: str | None = None
    """Run directory. Default: runs/<method>-<YYYYmmdd-HHMMSS>."""
    overwrite: bool = False
    """Replace an existing run directory (otherwise an existing one is refused, unless resuming)."""

    _homes = field_validator("dir")(classmethod(lambda cls, v: _home_exists(v)))


class Recipe(Section):
    """A full run description. Sections: models, data, method, rollout, optim, train, eval, output."""

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Method = Field(default_factory=MiniLlmMethod)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
