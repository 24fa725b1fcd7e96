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

from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from minillm_cli.config.schema import Recipe
from minillm_cli.data.cache_format import (
    MANIFEST,
    first_difference,
    identity,
    kind_of,
    model_sha256,
    read_manifest,
    shard_name,
    shard_problem,
    shard_size,
)


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
