"""Write model directories: atomically (complete or absent), with safetensors weights, and from GGUF.

`convert_gguf` turns a `.gguf` file into a float32 safetensors Hugging Face directory; `atomic_dir`
is the one way minillm creates a model directory (GGUF conversions, students built from a teacher).

torch and transformers are imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.errors import UserError

if TYPE_CHECKING:
    import torch

_TMP_MARK = ".tmp-"


# ------------------------------------------------------------------------------- writing dirs
@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; rename it to `out_dir` only if the block completes.

    An interrupted write leaves no `out_dir` (and removes its temp dir). If another process finished
    `out_dir` first, its copy is kept and ours is dropped.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; remove it or choose another output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_state_dict(model: "torch.nn.Module", path: Path) -> None:
    """Write a model's weights to one safetensors file, storing tied tensors once.

    safetensors refuses two names for one storage; tied embeddings (`tie_word_embeddings`) are that
    case. The first name (the input embedding, registered first) is kept; `from_pretrained` re-ties
    the output head from the config.
    """
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------- GGUF
def gguf_architecture(gguf_path: Path) -> str:
    """The `general.architecture` of a GGUF file (e.g. `llama`), read from its header."""
    import gguf

    try:
        field = gguf.GGUFReader(str(gguf_path)).fields.get("general.architecture")
    except Exception as e:
        raise UserError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    if field is None:
        raise UserError(f"{gguf_path}: GGUF file has no general.architecture")
    return str(field.contents())


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into a float32 safetensors Hugging Face directory at `out_dir`.

    transformers reads GGUF (dequantizing every tensor), but `save_pretrained` refuses a model loaded
    that way, so the weights, config (without its GGUF `quantization_config`), tokenizer and
    generation config are written here. The directory appears atomically.

    Args:
        gguf_path: The `.gguf` file.
        out_dir: The directory to create; must not exist.

    Returns:
        `out_dir`.

    Raises:
        UserError: The file is unreadable or its architecture is not supported by transformers.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    arch = gguf_architecture(gguf_path)
    kw: dict[str, Any] = dict(gguf_file=gguf_path.name, dtype=torch.float32)
    if hasattr(transformers, "GgufConfig"):
        # Newer transformers can keep GGUF blocks packed (GgufLinear); we want plain dense tensors.
        kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, NotImplementedError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{gguf_path}: GGUF architecture '{arch}' is not supported by transformers "
            f"{transformers.__version__} ({first})"
        ) from None

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    with atomic_dir(out_dir) as tmp:
        save_state_dict(model, tmp / "model.safetensors")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    return out_dir

