"""The teacher-cache format (layout: `teacher_cache`'s docstring): names, sizes, the identity of what a
cache holds, and its manifest — written by `minillm teacher-cache`, checked by every reader."""


from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli import __version__
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import UserError
from minillm_cli.runs.checkpoint import safetensors_problem

if TYPE_CHECKING:

    from minillm_cli.config.schema import Recipe

FORMAT = "minillm-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-shard-"
DTYPES = ("fp16", "bf16", "fp32")
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def bytes_per_token(top_k: int, dtype: str) -> int:
    """Disk bytes of one response token: K log-probs + K int32 ids + one fp32 tail."""
    return top_k * (DTYPE_BYTES[dtype] + 4) + 4


# ------------------------------------------------------------------------------------ hashes
def model_sha256(model_dir: Path) -> str:
    """sha256 of a model directory's config.json and weight files (names and contents, sorted).

    Reads every weight byte once (seconds per GB): the cache is only as good as the teacher it came
    from, and a fine-tuned teacher has the same shapes and file sizes as its base.
    """
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what turns text into ids: the fast tokenizer's pipeline (vocabulary, merges,
    normaliser, pre-tokeniser; without its runtime padding / truncation settings), else the
    vocabulary, plus the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline: Any = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        pipeline = sorted(tokenizer.get_vocab().items())
    spec = {"pipeline": pipeline, "chat_template": getattr(tokenizer, "chat_template", None),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False))}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def rows_sha256(train: list[data_mod.Encoded]) -> str:
    """sha256 of the tokenised training rows (index, prompt ids, response ids of each, in order)."""
    h = hashlib.sha256()
    for e in train:
        h.update(array("q", [e.index, len(e.prompt_ids), len(e.response_ids), *e.prompt_ids, *e.response_ids]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- identity
def data_identity(recipe: Recipe, tokenizer: Any) -> dict[str, Any]:
    """The data settings that decide the training rows, keyed by their recipe key."""
    from minillm_cli.runs.resume_check import data_hashes

    d = recipe.data
    hashes = data_hashes(d)
    return {
        "data.train": hashes["train"] or d.train,  # a hub dataset is known by its name
        "data.format": d.format, "data.split": d.split,
        "data.dev": (hashes["dev"] or d.dev) if d.dev is not None else None,
        "data.dev_fraction": d.dev_fraction if d.dev is None else None,
        # the seed shuffles the dev split out of the training file (data.split_dev)
        "train.seed": recipe.train.seed if d.dev is None and d.dev_fraction > 0 else None,
        "data.max_train_samples": d.max_train_samples, "data.system_prompt": d.system_prompt,
        "data.template": data_mod.resolve_template(d.template, tokenizer),
        "data.max_prompt_tokens": d.max_prompt_tokens, "data.max_total_tokens": d.max_total_tokens,
        "data.overlong": d.overlong,
    }


def answers_identity(recipe: Recipe) -> dict[str, Any]:
    """The sampler settings that decide SeqKD's answers (the recipe's, or seqkd's defaults under another method)."""
    from minillm_cli.config.methods import SeqKdMethod

    m = recipe.method if isinstance(recipe.method, SeqKdMethod) else SeqKdMethod()
    r = recipe.rollout
    return {"rollout.temperature": r.temperature, "rollout.top_k": r.top_k, "rollout.top_p": r.top_p,
            "method.max_new_tokens": m.max_new_tokens, "method.batch_size": m.batch_size,
            "sampling.seed": recipe.train.seed}


def kind_of(recipe: Recipe) -> str:
    """The cache a method reads: seqkd the teacher's answers, kd its log-probs."""
    return "answers" if recipe.method.name == "seqkd" else "logprobs"


def identity(recipe: Recipe, tokenizer: Any, train: list[data_mod.Encoded], vocab: int,
             kind: str = "logprobs") -> dict[str, Any]:
    """What a training run with `recipe` needs a cache of `kind` to be (teacher, K, dtype and shards aside)."""
    ident: dict[str, Any] = {"kind": kind, "tokenizer": tokenizer_sha256(tokenizer)}
    if kind == "logprobs":
        ident["vocab"] = vocab
    ident.update(data_identity(recipe, tokenizer))
    if kind == "answers":
        ident.update(answers_identity(recipe))
    return {**ident, "examples": len(train), "tokens": sum(len(e.response_ids) for e in train),
            "rows": rows_sha256(train)}


_WHAT = {"kind": "what the cache holds (logprobs for kd, answers for seqkd)",
         "sampling.seed": "train.seed (the answers' sampling seed)", "tokenizer": "the tokenizer (sha256)", "vocab": "the student's output width",
         "rows": "the tokenised training rows (sha256)", "examples": "the number of training examples",
         "tokens": "the number of response tokens", "data.train": "data.train (file sha256)",
         "data.dev": "data.dev (file sha256)", "teacher": "the teacher's weights (sha256)"}


def first_difference(cached: dict[str, Any], now: dict[str, Any], keys: list[str]) -> str | None:
    """'what (cached → now)' for the first key of `keys` whose value differs, else None."""
    for key in keys:
        if cached.get(key) != now.get(key):
            a, b = cached.get(key), now.get(key)
            if isinstance(a, str) and isinstance(b, str) and len(a) == len(b) == 64:  # hashes: a prefix is enough
                a, b = a[:12] + "…", b[:12] + "…"
            return f"{_WHAT.get(key, key)}: {a!r} in the cache, {b!r} here"
    return None


# ---------------------------------------------------------------------------------- manifest
def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a cache directory, None when there is none; a UserError when it is unreadable."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable teacher-cache manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a minillm teacher-cache manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: teacher-cache format version {manifest.get('version')} (this minillm reads "
                        f"{VERSION}); rebuild the cache")
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise UserError(f"{path}: damaged teacher-cache manifest: {problem}; rebuild the cache (delete the directory "
                        "and run `minillm teacher-cache` again)")
    return manifest


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is malformed in a manifest's structure (a hand edit, a truncated copy), or None."""
    ident = manifest.get("identity")
    if not isinstance(ident, dict):
        return f"'identity' must be a mapping, got {_shown(ident)}"
    if ident.get("kind") not in ("logprobs", "answers"):
        return f"'identity.kind' must be logprobs or answers, got {_shown(ident.get('kind'))}"
    for key, least in (("examples", 0), ("tokens", 0), ("shard_examples", 1)):
        if not _whole(ident.get(key), least):
            return f"'identity.{key}' must be a whole number >= {least}, got {_shown(ident.get(key))}"
    if ident["kind"] == "logprobs":
        if not _whole(ident.get("top_k"), 1):
            return f"'identity.top_k' must be a whole number >= 1, got {_shown(ident.get('top_k'))}"
        if ident.get("dtype") not in DTYPES:
            return f"'identity.dtype' must be one of {', '.join(DTYPES)}, got {_shown(ident.get('dtype'))}"
    if not isinstance(ident.get("teacher"), str):
        return f"'identity.teacher' must be the teacher's sha256, got {_shown(ident.get('teacher'))}"
    want = (ident["examples"] + ident["shard_examples"] - 1) // ident["shard_examples"]
    if not _whole(manifest.get("shards"), 0) or manifest["shards"] != want:
        return f"'shards' must be {want} (examples / shard_examples), got {_shown(manifest.get('shards'))}"
    sizes = manifest.get("shard_bytes", {})
    if not isinstance(sizes, dict) or not all(isinstance(k, str) and _whole(v, 0) for k, v in sizes.items()):
        return f"'shard_bytes' must map shard files to sizes in bytes, got {_shown(sizes)}"
    if not isinstance(manifest.get("complete", False), bool):
        return f"'complete' must be true or false, got {_shown(manifest.get('complete'))}"
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def new_manifest(ident: dict[str, Any], *, teacher: dict[str, str], top_k: int | None, dtype: str | None,
                 shard_examples: int) -> dict[str, Any]:
    n = ident["examples"]
    per_token = 4 if top_k is None or dtype is None else bytes_per_token(top_k, dtype)  # answers: one int32 id
    return {"format": FORMAT, "version": VERSION, "minillm_version": __version__,
            "identity": {**ident, "teacher": teacher["sha256"], "top_k": top_k, "dtype": dtype,
                         "shard_examples": shard_examples},
            "teacher_path": teacher["path"], "shards": (n + shard_examples - 1) // shard_examples,
            "bytes_per_token": per_token,
            "complete": False, "shard_bytes": {}}


def shard_problem(path: Path, examples: int, size: int | None = None) -> str | None:
    """What is wrong with a shard file (missing, truncated, other content), or None."""
    if not path.is_file():
        return "missing"
    problem = safetensors_problem(path)
    if problem is not None:
        return problem
    if size is not None and path.stat().st_size != size:
        return f"{path.stat().st_size} bytes, the manifest says {size}"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("examples") != str(examples):
        return f"holds {meta.get('examples')} examples, {examples} expected"
    return None


def shard_size(ident: dict[str, Any], i: int) -> int:
    """Examples in shard `i` of a cache with this identity (shards hold `shard_examples`, the last the rest)."""
    s, n = int(ident["shard_examples"]), int(ident["examples"])
    return min(s, n - i * s)
