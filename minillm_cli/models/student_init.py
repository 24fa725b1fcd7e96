"""Build a student from a teacher: a layer-pruned copy (`init_student_from_teacher`) or a freshly
initialised smaller model of the same architecture (`init_student_fresh`).

Both write a complete Hugging Face directory atomically (`model_dirs.atomic_dir`) that shares the
teacher's tokenizer and generation config. torch and transformers are imported inside functions.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Any

from minillm_cli.errors import UserError
from minillm_cli.models.dirs import atomic_dir

LAYER_KEY = re.compile(r"^((?:[^.]+\.)*?(?:layers|h))\.(\d+)\.(.+)$")


def _evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """`keep` layer indices out of `n_layers`, evenly spaced, first and last included (keep=1: [0])."""
    if keep == 1:
        return [0]
    return [int(i * (n_layers - 1) / (keep - 1) + 0.5) for i in range(keep)]


def _read_safetensors_keys(model_dir: Path) -> dict[str, Path]:
    """Every tensor name in a model directory's safetensors files -> the file that holds it."""
    from safetensors import safe_open

    # Only weight files: a training step dir also holds state.safetensors (optimizer, RNG).
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: building a student needs safetensors weights (found none)")
    from minillm_cli.runs.checkpoint import check_weights

    check_weights(model_dir)
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            where.update({k: f for k in st.keys()})
    return where


def _copy_tokenizer_and_generation(src: Path, dst: Path) -> None:
    """Copy the tokenizer (through AutoTokenizer, whatever its files) and generation_config.json."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", dst / "generation_config.json")


def init_student_from_teacher(
    teacher_dir: Path, out_dir: Path, *, layers: list[int] | None = None, keep: int | None = None
) -> Path:
    """Write a layer-pruned copy of the teacher: the same model with only some of its blocks.

    Embeddings, final norm, output head and every other non-layer weight are copied as is; kept
    layer `layers[j]` of the teacher becomes layer `j` of the student. Layers are found as
    `<prefix>.layers.N.*` (llama, OPT, ...) or `<prefix>.h.N.*` (GPT-2).

    Args:
        teacher_dir: A local teacher model directory with safetensors weights.
        out_dir: The directory to create (atomically).
        layers: Teacher layer indices to keep, strictly increasing.
        keep: Or: keep this many evenly spaced layers, first and last included.

    Returns:
        `out_dir`.

    Raises:
        UserError: Bad layer choice, or weights whose layer stack cannot be found.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(teacher_dir)
    n = config.num_hidden_layers
    if (layers is None) == (keep is None):
        raise UserError("models.student_init: give exactly one of `layers` or `keep`")
    if keep is not None and not 1 <= keep <= n:
        raise UserError(f"models.student_init.keep: {keep} is not in 1..{n} (the teacher has {n} layers)")
    layers = _evenly_spaced(n, keep) if keep is not None else list(layers or [])
    if not layers or any(i < 0 or i >= n for i in layers):
        raise UserError(
            f"models.student_init.layers: {layers} must be indices in 0..{n - 1} (the teacher has {n} layers)"
        )
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise UserError(f"models.student_init.layers: {layers} must be strictly increasing")

    where = _read_safetensors_keys(teacher_dir)
    matches = {k: LAYER_KEY.match(k) for k in where}
    prefixes = {m.group(1) for m in matches.values() if m}
    found = {int(m.group(2)) for m in matches.values() if m}
    if len(prefixes) != 1 or found != set(range(n)):
        raise UserError(
            f"{teacher_dir}: cannot find its {n} layers as '*.layers.N.*' or '*.h.N.*' weights "
            f"(found prefixes {sorted(prefixes)}); layer pruning supports llama- and GPT-2-style models"
        )
    new_index = {old: new for new, old in enumerate(layers)}

    # Read only what the student keeps; file handles stay open while we copy.
    tensors = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(where.values())}
        for key, f in where.items():
            m = matches[key]
            if m is None:
                tensors[key] = handles[f].get_tensor(key)
            elif int(m.group(2)) in new_index:
                tensors[f"{m.group(1)}.{new_index[int(m.group(2))]}.{m.group(3)}"] = handles[f].get_tensor(key)

    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Gemma...)
        config.layer_types = [config.layer_types[i] for i in layers]
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        _copy_tokenizer_and_generation(teacher_dir, tmp)
    return out_dir


def init_student_fresh(teacher_dir: Path, out_dir: Path, *, overrides: dict[str, Any], seed: int = 0) -> Path:
    """Write a freshly initialised (random) model of the teacher's architecture, with a smaller config.

    The teacher's config is copied and `overrides` applied (e.g. `{"num_hidden_layers": 4,
    "hidden_size": 256, "intermediate_size": 1024}`); names may be the generic ones even where the
    config calls them otherwise (GPT-2's `n_layer`). Unless overridden too, `head_dim` follows
    `hidden_size / num_attention_heads`, `num_key_value_heads` is reduced to the head count where it
    no longer divides it, and `layer_types` is recomputed. The teacher's tokenizer is shared.

    Args:
        teacher_dir: A local teacher model directory.
        out_dir: The directory to create (atomically).
        overrides: Config fields to change.
        seed: Seed of the random initialisation.

    Returns:
        `out_dir`.

    Raises:
        UserError: An override names a field the config does not have, or the result is invalid.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    base = AutoConfig.from_pretrained(teacher_dir)
    canon = lambda k: base.attribute_map.get(k, k)  # noqa: E731  generic name -> this config's name
    d = base.to_dict()
    changed = {canon(k): v for k, v in overrides.items()}
    for key in changed:
        if key not in d:
            raise UserError(f"models.student_init.config.{key}: {type(base).__name__} has no such field")
    d.update(changed)

    hidden, heads = canon("hidden_size"), canon("num_attention_heads")
    if "head_dim" in d and "head_dim" not in changed and (hidden in changed or heads in changed):
        d["head_dim"] = d[hidden] // d[heads]
    kv = d.get("num_key_value_heads")
    if kv and "num_key_value_heads" not in changed and d[heads] % kv:
        d["num_key_value_heads"] = d[heads]
    if "layer_types" in d and "layer_types" not in changed and canon("num_hidden_layers") in changed:
        del d["layer_types"]  # the config class derives it again for the new depth
    try:
        config = type(base).from_dict(d)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, TypeError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:160]
        raise UserError(f"models.student_init.config: {overrides} gives an invalid model ({reason})") from None
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        _copy_tokenizer_and_generation(teacher_dir, tmp)
    return out_dir
