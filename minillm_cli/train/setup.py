"""Setting up a training run, before any training step: claim the run directory, check a resume
against its checkpoint, resolve and load models, tokenizers and data, and write the resolved recipe.

Every rank checks every input; all of them stop, with one message, if any rank failed, before the
main process writes anything (`distributed.agree_on_setup`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from minillm_cli import __version__
from minillm_cli.config.loading import dump_resolved
from minillm_cli.config.schema import Recipe
from minillm_cli.data import encoding as data_mod
from minillm_cli.data.teacher_cache import TeacherCache, check_resumed, open_cache, run_record
from minillm_cli.errors import UserError
from minillm_cli.models import loading as models_mod
from minillm_cli.parallel.distributed import agree_on_setup, check_launch
from minillm_cli.runs import checkpoint as ckpt
from minillm_cli.runs import resume_check, rundir, steps
from minillm_cli.runs.destinations import recipe_inputs
from minillm_cli.train import prepare


@dataclass
class Setup:
    """What `set_up` prepared: the run directory, the models (not yet wrapped by accelerate), the data."""

    run_dir: Path
    resume_dir: Path | None
    resume_state: tuple[dict[str, Any], dict[str, torch.Tensor]] | None
    """This rank's (trainer_state, tensors) of the checkpoint resumed from."""
    recipe_text: str
    """The resolved recipe as written to recipe.yaml (and into every checkpoint)."""
    hashes: dict[str, str | None]
    extended: list[dict[str, Any]]
    teacher_dir: Path | None
    student_dir: Path
    student_init: dict[str, Any]
    tokenizer: Any
    train: list[data_mod.Encoded]
    dev: list[data_mod.Encoded]
    corpus: list[list[int]] | None
    dtype: torch.dtype
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    vocab: int
    """Student output width; teacher logits are sliced to it."""
    teacher_cache: TeacherCache | None = None
    """The opened, checked `data.teacher_cache` (kd then runs without a teacher)."""
    teacher_tokenizer: Any = None
    """With models.cross_tokenizer: the teacher's own tokenizer."""
    teacher_prompts: dict[int, list[int]] | None = None
    """With models.cross_tokenizer: each training example's prompt in the teacher's template and ids."""

    def meta(self, recipe: Recipe) -> dict[str, Any]:
        """The run's part of every checkpoint's meta.json (the step adds its own)."""
        m = recipe.models
        return {
            "method": recipe.method.name, "method_settings": recipe.method.model_dump(),
            "teacher": m.teacher, "teacher_dir": str(self.teacher_dir) if self.teacher_dir else None,
            "student": m.student, "student_init": self.student_init,
            "data": {"path": recipe.data.train, "sha256": self.hashes["train"], "dev_sha256": self.hashes["dev"],
                     "corpus_sha256": self.hashes["corpus"]},
            "extended": self.extended,
            "lora": m.lora.enabled, "base_model": str(self.student_dir) if m.lora.enabled else None,
            "minillm_version": __version__,
            **({"teacher_cache": run_record(self.teacher_cache)} if self.teacher_cache is not None else {}),
        }


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def set_up(recipe: Recipe, source: dict[str, str], accelerator: Any, resume: bool, extend: bool,
           say: Callable[[str], None], claims: list[rundir.Claim]) -> Setup:
    """Everything before the optimizer exists; the main process's claim on the run dir goes to `claims`
    (the caller abandons it if the run fails before its first checkpoint, and releases it at the end)."""
    tr, m = recipe.train, recipe.models
    device = accelerator.device
    main = accelerator.is_main_process
    run_dir = Path(recipe.output.dir) if recipe.output.dir else default_run_dir(recipe.method.name)
    if accelerator.num_processes > 1 and not recipe.output.dir:  # rank 0's timestamp names the run
        from accelerate.utils import broadcast_object_list

        run_dir = broadcast_object_list([run_dir])[0]
    setup_error: Exception | None = None
    claim: rundir.Claim | None = None
    extension: dict[str, Any] | None = None
    extended: list[dict[str, Any]] = []
    try:
        check_launch(recipe, accelerator, resume)
        # ---- run directory: owned by the main process from here on (a lock; nothing deleted yet)
        hashes = resume_check.data_hashes(recipe.data)  # once: compared on resume, recorded in meta.json
        if main:
            claim = rundir.claim(run_dir, resume=resume, overwrite=recipe.output.overwrite,
                                 protected=recipe_inputs(recipe))
            claims.append(claim)
        resume_dir: Path | None = None
        if resume:
            resume_dir, skipped = rundir.resumable_step(run_dir)
            for note in skipped:
                say(f"--resume: skipping damaged checkpoint {note}")
            ckpt.check_world_size(resume_dir, accelerator.num_processes)
            extension, extended = resume_check.check_checkpoint(recipe, resume_dir, hashes, extend)

        # ---- models and data
        teacher_dir, student_dir, student_init = prepare.resolve_models(recipe, say)
        tokenizer = models_mod.load_tokenizer(student_dir, trust_remote_code=m.trust_remote_code)
        tokenizer.padding_side = "left"
        t_tok = None
        if teacher_dir is not None:
            t_tok = models_mod.load_tokenizer(teacher_dir, trust_remote_code=m.trust_remote_code)
            if m.cross_tokenizer:
                say(f"cross-tokenizer mode (models.cross_tokenizer): the teacher scores the student's text, "
                    f"re-tokenised with its own tokenizer ({len(t_tok)} ids; the student's: {len(tokenizer)})")
            else:
                models_mod.check_tokenizers(t_tok, tokenizer, teacher_vocab=models_mod.output_width(teacher_dir),
                                            student_vocab=models_mod.output_width(student_dir))
        train_enc, dev_enc, train_examples, _ = data_mod.prepare_datasets(recipe.data, tokenizer, tr.seed, say)
        teacher_prompts = None
        if m.cross_tokenizer and t_tok is not None:  # each training prompt as the teacher sees it
            teacher_prompts = data_mod.teacher_prompts(train_enc, train_examples, t_tok, recipe.data)
        corpus = None
        if recipe.data.corpus and recipe.method.name == "minillm":
            corpus = data_mod.load_corpus(recipe.data.corpus, tokenizer, recipe.data.corpus_max_tokens)
        cache = None
        if recipe.data.teacher_cache is not None:  # checked against this run before any model is loaded
            cache = open_cache(recipe, tokenizer, train_enc, models_mod.output_width(student_dir), teacher_dir)
            if resume_dir is not None:
                check_resumed(cache, steps.read_json(resume_dir / "meta.json").get("teacher_cache"))

        dtype = models_mod.pick_dtype(m.dtype, device)
        load_kw = dict(dtype=dtype, device=device, trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
        student = prepare.load_student(student_dir, recipe, resume_dir, load_kw)
        teacher = None
        if teacher_dir is not None and cache is None:  # kd from a cache never loads the teacher
            teacher = prepare.load_teacher(teacher_dir, recipe, device, load_kw)
        vocab = student.get_output_embeddings().weight.shape[0]

        resume_state = None
        if resume_dir is not None:
            resume_state = ckpt.load_resume_state(resume_dir, accelerator.process_index, accelerator.num_processes)
    except Exception as e:  # re-raised by agree_on_setup, on every rank
        setup_error = e
    agree_on_setup(accelerator, setup_error)

    # ---- run dir + resolved recipe (a resumed run keeps its recipe unless --extend changed it)
    recipe_text = dump_resolved(recipe, source)
    if main:
        assert claim is not None
        try:
            claim.prepare()
            if resume_dir is None or extension is not None:
                ckpt.write_text_atomic(run_dir / "recipe.yaml", recipe_text)
            if resume_state is not None:
                dropped = rundir.trim_metrics(run_dir, int(resume_state[0]["step"]))
                if dropped:
                    say(f"metrics.jsonl: dropped {dropped} records of steps after the checkpoint (not saved before the stop)")
        except OSError as e:
            what = "disk full" if ckpt.is_disk_full(e) else (e.strerror or str(e))
            raise UserError(f"output.dir: cannot write the run directory {run_dir}: {what}") from None
    if extension is not None:
        assert resume_state is not None
        extended = [*extended, {**extension, "at_step": int(resume_state[0]["step"])}]
        say(f"--extend: train.max_steps {extension['from']} → {extension['to']} (recorded in meta.json)")
    accelerator.wait_for_everyone()
    return Setup(run_dir=run_dir, resume_dir=resume_dir, resume_state=resume_state, recipe_text=recipe_text,
                 hashes=hashes, extended=extended, teacher_dir=teacher_dir, student_dir=student_dir,
                 student_init=student_init, tokenizer=tokenizer, train=train_enc, dev=dev_enc, corpus=corpus,
                 dtype=dtype, student=student, teacher=teacher, vocab=vocab, teacher_cache=cache,
                 teacher_tokenizer=t_tok if m.cross_tokenizer else None, teacher_prompts=teacher_prompts)
