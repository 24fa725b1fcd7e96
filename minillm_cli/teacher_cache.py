"""Teacher caches: the teacher's top-k log-probs at every response position of the training data
(`kind: logprobs`, read by `method: kd`), or the teacher's own sampled answers to the training prompts
(`kind: answers`, `teacher-cache --answers`, read by `method: seqkd`); written once by `minillm
teacher-cache` (`teacher_cache_command.py`) and read with `data.teacher_cache: DIR`, so that the run
loads no teacher.

A cache directory holds

    manifest.json              what the cache is (`identity`), its shard plan, and `complete`
    shard-00000.safetensors    the rows of examples 0 .. S-1 of the training set, then 00001 ...

and one shard, for its E examples with N response tokens in all (one row per response token, the
examples' rows one after the other, in training-set order), holds

    ids       (N, K) int32          the teacher's top-K ids at that position, most likely first
    logprobs  (N, K) fp16|bf16|fp32 their log-probs (log-softmax over the student's output width)
    tail      (N,)   fp32           log of the remaining mass, log(1 − Σ_top p)
    offsets   (E+1,) int64          example e's rows are offsets[e] : offsets[e+1]
    index     (E,)   int64          `Encoded.index` of each example

so a response token costs K·(b + 4) + 4 bytes (b = 2 for fp16: 388 B at K = 64). An answers shard
holds `response_ids` (N,) int32 (the teacher's answers, EOS included unless cut by
`method.max_new_tokens`), `offsets` and `index`: 4 bytes per answer token.

The identity names everything that decides which rows exist and what they hold: the teacher's
weights (sha256), the tokenizer (sha256 of its pipeline, special tokens and chat template), the
student's output width, the data (file hashes, format, split, system prompt, template, max lengths,
overlong rule, dev split), a hash of the tokenised rows themselves, K and the storage dtype (answers:
the sampler's temperature, top-k, top-p, max new tokens, batch size and seed instead). A
training run recomputes it from its own recipe and refuses a cache that differs, naming the first
difference (`open_cache`); `minillm teacher-cache` continues a cache with the same identity and
refuses to touch one with another (`check_out_dir`).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli import __version__
from minillm_cli import data as data_mod
from minillm_cli.checkpoint import safetensors_problem
from minillm_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from minillm_cli.config import Recipe

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
    from minillm_cli.resume_check import data_hashes

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
    from minillm_cli.config import SeqKdMethod

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


# ------------------------------------------------------------------------------------ reading
class TeacherCache:
    """An opened, checked cache: the teacher's rows of any training example, read from memory-mapped
    shards (each rank reads only the rows of its own examples)."""

    def __init__(self, root: Path, manifest: dict[str, Any], where: dict[int, tuple[int, int, int]]) -> None:
        self.root = root
        self.manifest = manifest
        self.kind = str(manifest["identity"]["kind"])
        self.top_k = int(manifest["identity"]["top_k"] or 0)
        self.dtype = str(manifest["identity"]["dtype"])
        self._where = where  # Encoded.index -> (shard, first row, rows)
        self._files: dict[int, Any] = {}

    def _file(self, shard: int) -> Any:
        if shard not in self._files:
            from safetensors import safe_open

            self._files[shard] = safe_open(str(self.root / shard_name(shard)), framework="pt")
        return self._files[shard]

    def batch(self, examples: list[data_mod.Encoded], T: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached teacher of a micro-batch in the prompt/response layout (`data.collate_pairs`).

        Returns:
            `(ids, logprobs, tail)` on `device`: (B, T, K) int32, (B, T, K) in the storage dtype,
            (B, T) fp32; response token t of row b at [b, t]; padding columns hold zeros (the
            response mask excludes them: `losses.sparse_divergence` ignores masked positions).
        """
        import torch

        B, K = len(examples), self.top_k
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]
        ids = torch.zeros((B, T, K), dtype=torch.int32)
        logprobs = torch.zeros((B, T, K), dtype=dtype)
        tail = torch.zeros((B, T), dtype=torch.float32)
        for row, e in enumerate(examples):
            shard, start, n = self._where[e.index]
            if n != len(e.response_ids) or n > T:
                raise UserError(f"data.teacher_cache: {self.root}: example {e.index} has {n} cached positions, the "
                                f"run has {len(e.response_ids)} response tokens; rebuild the cache")
            f = self._file(shard)
            ids[row, :n] = f.get_slice("ids")[start : start + n]
            logprobs[row, :n] = f.get_slice("logprobs")[start : start + n]
            tail[row, :n] = f.get_slice("tail")[start : start + n]
        return ids.to(device), logprobs.to(device), tail.to(device)

    def answers(self, train: list[data_mod.Encoded]) -> list[list[int]]:
        """The teacher's answer to each example of `train` (an answers cache), in that order."""
        out = []
        for e in train:
            shard, start, n = self._where[e.index]
            out.append(self._file(shard).get_slice("response_ids")[start : start + n].tolist())
        return out


def open_cache(recipe: Recipe, tokenizer: Any, train: list[data_mod.Encoded], vocab: int,
               teacher_dir: Path | None) -> TeacherCache:
    """Open `data.teacher_cache` for a training run, or refuse it (before any model is loaded).

    The cache must hold what the method reads (`kind_of`: log-probs for kd, answers for seqkd).

    Raises:
        UserError: one line naming what differs from the run (what the cache holds, tokenizer, data
            file, template, max lengths, sampler settings of answers, the rows, the teacher when the
            recipe names one), or the shard that is missing, truncated or damaged, or that the cache
            is incomplete.
    """
    assert recipe.data.teacher_cache is not None
    root = Path(recipe.data.teacher_cache).expanduser()
    key = f"data.teacher_cache: {root}"
    if not root.is_dir():
        raise UserError(f"{key}: no such directory; build it first with `minillm teacher-cache`")
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"{key}: not a teacher cache (no {MANIFEST}); build it with `minillm teacher-cache`")
    cached = manifest["identity"]
    if not manifest.get("complete"):
        done = sum(shard_problem(root / shard_name(i), shard_size(cached, i)) is None
                   for i in range(manifest["shards"]))
        raise UserError(f"{key}: incomplete ({done} of {manifest['shards']} shards written); finish it by running "
                        "the `minillm teacher-cache` command that started it again")
    now = identity(recipe, tokenizer, train, vocab, kind_of(recipe))
    diff = first_difference(cached, now, list(now))
    if diff is None and teacher_dir is not None:
        diff = first_difference(cached, {"teacher": model_sha256(teacher_dir)}, ["teacher"])
    if diff is not None:
        raise UserError(f"{key}: built for another run: {diff}; rebuild it for this recipe with `minillm teacher-cache`")
    sizes = manifest.get("shard_bytes", {})
    where: dict[int, tuple[int, int, int]] = {}
    from safetensors import safe_open

    for i in range(manifest["shards"]):
        path = root / shard_name(i)
        problem = shard_problem(path, shard_size(cached, i), sizes.get(shard_name(i)))
        if problem is not None:
            raise UserError(f"{key}: {shard_name(i)} is {problem}; rebuild the cache (delete the directory and run "
                            "`minillm teacher-cache` again)")
        with safe_open(str(path), framework="pt") as f:
            offsets, index = f.get_tensor("offsets").tolist(), f.get_tensor("index").tolist()
            if cached["kind"] == "answers":
                shape, want_shape = f.get_slice("response_ids").get_shape(), [offsets[-1]]
                dtype = want = f.get_slice("response_ids").get_dtype()
            else:
                shape, want_shape = f.get_slice("ids").get_shape(), [offsets[-1], cached["top_k"]]
                dtype = f.get_slice("logprobs").get_dtype()
                want = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[cached["dtype"]]
        if shape != want_shape or dtype != want:
            raise UserError(f"{key}: {shard_name(i)} does not match its manifest (rows {shape}, dtype {dtype})")
        for e, idx in enumerate(index):
            where[idx] = (i, offsets[e], offsets[e + 1] - offsets[e])
    missing = [e.index for e in train if e.index not in where]
    if missing:
        raise UserError(f"{key}: {len(missing)} training examples have no cached rows (first: {missing[0]})")
    return TeacherCache(root, manifest, where)


def run_record(cache: TeacherCache) -> dict[str, Any]:
    """What a run's meta.json keeps of the cache it trains from (compared again on --resume)."""
    ident = cache.manifest["identity"]
    return {"dir": str(cache.root), "kind": cache.kind, "top_k": ident["top_k"], "dtype": ident["dtype"],
            "teacher_sha256": ident["teacher"]}


def check_resumed(cache: TeacherCache, saved: dict[str, Any] | None) -> None:
    """A resumed run must read the cache its checkpoint was trained from, not one rebuilt since in its place.

    Raises:
        UserError: what differs from the checkpoint's record (`run_record` in its meta.json).
    """
    if saved is None:
        return  # the run started without a cache: the recipe comparison of --resume names data.teacher_cache
    now = run_record(cache)
    for key in ("kind", "top_k", "dtype", "teacher_sha256"):
        if saved.get(key) != now[key]:
            raise UserError(f"--resume: data.teacher_cache {cache.root} changed since the run started ({key}: "
                            f"{saved.get(key)!r} then, {now[key]!r} now); resume with the cache the run started with")


def shard_size(ident: dict[str, Any], i: int) -> int:
    """Examples in shard `i` of a cache with this identity (shards hold `shard_examples`, the last the rest)."""
    s, n = int(ident["shard_examples"]), int(ident["examples"])
    return min(s, n - i * s)
