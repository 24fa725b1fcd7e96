"""Model preparation for a training run: resolve teacher and student to local directories (building
the student when the recipe asks for it), then load them as the recipe says: the student with LoRA or
resumed weights, frozen lower blocks and no dropout; the frozen teacher where its placement puts it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from minillm_cli.config.schema import Recipe
from minillm_cli.errors import UserError
from minillm_cli.methods import METHODS
from minillm_cli.models import loading as models_mod
from minillm_cli.models import student_init
from minillm_cli.runs import checkpoint as ckpt


def _resolve(key: str, name: str) -> Path:
    """`models_mod.resolve_model`, its errors prefixed with the recipe key they are about."""
    try:
        return models_mod.resolve_model(name)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def resolve_models(recipe: Recipe, say: Callable[[str], None]) -> tuple[Path | None, Path, dict[str, Any]]:
    """Resolve teacher and student to local model directories (building the student if asked).

    Returns (teacher_dir or None, student_dir, student_init record for the run's meta).
    """
    m = recipe.models
    needs_teacher = METHODS[recipe.method.name].needs_teacher and recipe.data.teacher_cache is None  # kd from a cache
    if needs_teacher and m.teacher is None:
        raise UserError(f"models.teacher: method {recipe.method.name} needs a teacher (set it or pass --teacher)")
    teacher_dir = _resolve("models.teacher", m.teacher) if m.teacher is not None else None
    if m.student is not None:
        return teacher_dir, _resolve("models.student", m.student), {"from": "model", "path": m.student}
    if m.student_init is None:
        raise UserError("models.student: no student given (set models.student, models.student_init or --student)")
    if teacher_dir is None:
        raise UserError("models.student_init: building a student from the teacher needs models.teacher")
    init = m.student_init
    record = init.model_dump(by_alias=True)
    spec = json.dumps({"teacher": str(teacher_dir.resolve()), **record}, sort_keys=True, default=str)
    key = f"{teacher_dir.name}-{init.from_}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    out = models_mod.cache_dir() / "students" / key
    if not (out / "config.json").exists():
        say(f"building student ({init.from_}) from {teacher_dir} -> {out}")
        if init.from_ == "teacher":
            student_init.init_student_from_teacher(teacher_dir, out, layers=init.layers, keep=init.keep)
        else:
            student_init.init_student_fresh(teacher_dir, out, overrides=init.config)
    record["path"] = str(out)
    return teacher_dir, out, record


def load_student(student_dir: Path, recipe: Recipe, resume_dir: Path | None,
                 load_kw: dict[str, Any]) -> Any:
    """The student (an HF causal LM, or its peft wrapper) ready to train: LoRA or resumed weights, frozen lower blocks, no dropout."""
    m = recipe.models
    student = models_mod.load_model(student_dir, **load_kw)
    if m.lora.enabled:
        student = apply_lora(student, recipe, resume_dir)
    elif resume_dir is not None:
        load_weights(student, resume_dir)
    if m.trainable_layers is not None:
        freeze_below(student, m.trainable_layers)
    student.train()
    disable_dropout(student)  # distillation and our SFT run without dropout (reference setting)
    return student


def load_teacher(teacher_dir: Path, recipe: Recipe, student_device: torch.device,
                 load_kw: dict[str, Any]) -> torch.nn.Module:
    """The frozen teacher, placed as `models.teacher_placement` says (a sharded one is wrapped later)."""
    placement = recipe.models.teacher_placement
    device = teacher_device(placement, student_device)
    teacher = models_mod.load_model(teacher_dir, **{**load_kw, "device": device})
    teacher.requires_grad_(False)
    if placement == "cpu" or placement.startswith("device:"):
        outputs_to_caller(teacher, device)
    return teacher


def teacher_device(placement: str, student_device: torch.device) -> torch.device:
    """Where `models.teacher_placement` loads the teacher (a sharded one first loads on the student's)."""
    if placement == "cpu":
        return torch.device("cpu")
    if placement.startswith("device:"):
        return torch.device(student_device.type, int(placement[7:]))
    return student_device


def outputs_to_caller(model: torch.nn.Module, device: torch.device) -> None:
    """Run `model` on `device` whatever device its inputs come from, and hand its outputs (logits)
    back on the inputs' device: callers keep using the student's device for everything."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(model, AlignDevicesHook(execution_device=device, io_same_device=True))


def freeze_below(model: torch.nn.Module, top: int) -> None:
    """Freeze everything except the top `top` transformer blocks and the final norm."""
    block = {name: int(m.group(2)) for name, _ in model.named_parameters() if (m := student_init.LAYER_KEY.match(name))}
    layer_ids = sorted(set(block.values()))
    if not layer_ids:
        raise UserError("models.trainable_layers: cannot find the transformer blocks (*.layers.N / *.h.N) of the student")
    if top > len(layer_ids):
        raise UserError(f"models.trainable_layers: {top} is more than the student's {len(layer_ids)} blocks")
    keep = set(layer_ids[-top:])
    for name, p in model.named_parameters():
        final_norm = name not in block and ("norm" in name or "ln_f" in name)
        p.requires_grad_(block.get(name, -1) in keep or final_norm)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_weights(model: torch.nn.Module, step_dir: Path) -> None:
    """Load full student weights written by `save_pretrained` (one file or an indexed set of shards)."""
    from safetensors.torch import load_file

    index = step_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(step_dir / name)))
    ckpt.check_weights(step_dir)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise UserError(f"{step_dir}: checkpoint does not match the student (shape of {wrong[0]}"
                        f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}); resume with the run's own student")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output embeddings are saved once; anything else missing is a real problem.
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise UserError(f"{step_dir}: checkpoint does not match the student "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")


def apply_lora(student: torch.nn.Module, recipe: Recipe, resume_dir: Path | None) -> torch.nn.Module:
    try:
        import peft
    except ImportError:
        raise UserError("models.lora.enabled: LoRA needs peft (pip install 'minillm[lora]')") from None
    if resume_dir is not None:
        return peft.PeftModel.from_pretrained(student, str(resume_dir), is_trainable=True)
    lc = recipe.models.lora
    cfg = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                          task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(student, cfg)
    except ValueError as e:
        raise UserError(f"models.lora.target_modules: {e}") from None
