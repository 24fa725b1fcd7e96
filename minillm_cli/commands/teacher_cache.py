"""`minillm teacher-cache`: run the teacher once over the training data and write its top-k
log-probs per response position, or (`--answers`) its sampled answers to the training prompts, as
SeqKD draws them (format: `minillm_cli.teacher_cache`).

The training rows are exactly a training run's (`data.prepare_datasets` with the recipe's data
section and seed: same templates, truncation, dev split and masking), tokenised with the student's
tokenizer when the recipe names a student (else the teacher's), and the teacher's softmax is taken
over the student's output width, as live KD slices it. Shards are written one by one, each
atomically (a temporary name, fsync, rename): an interrupt (SIGINT / SIGTERM) or a crash loses at
most the shard in progress, and the same command run again continues with the next missing shard.
An --out that holds anything else (another cache, other files) is never touched.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from minillm_cli.config.schema import Recipe
from minillm_cli.data import cache_format
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import RunStopped, UserError
from minillm_cli.losses import sparse
from minillm_cli.methods.batching import length_groups, response_logits, take_group
from minillm_cli.models import cpu_tuning
from minillm_cli.models import loading as models_mod
from minillm_cli.progress import Phase
from minillm_cli.runs.checkpoint import write_text_atomic
from minillm_cli.runs.destinations import check_directory, recipe_inputs
from minillm_cli.train import prepare
from minillm_cli.train.signals import StopSignals

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_out_dir(out: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse an --out that is neither new, empty, nor a cache of exactly this identity.

    Returns:
        The existing manifest to continue (same identity), or None for a new cache.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a directory")
    if not out.exists():
        return None
    existing = cache_format.read_manifest(out)
    if existing is None:  # not a cache: anything in it is the user's, a `.tmp-shard-*` name included
        names = sorted(p.name for p in out.iterdir())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise UserError(f"--out: {out} is not empty and not a teacher cache (holds {shown}); use a new directory")
        return None
    cached, now = existing["identity"], manifest["identity"]
    diff = cache_format.first_difference(cached, now, sorted(set(cached) | set(now)))
    if diff is not None:
        raise UserError(f"--out: {out} holds another teacher cache ({diff}); use another --out, or delete it first")
    return existing


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], examples: int) -> int:
    """Write one shard atomically; returns its size in bytes."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{cache_format.TMP_PREFIX}{path.stem}-{os.getpid()}.safetensors")
    save_file(tensors, str(tmp), metadata={"examples": str(examples)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
    return path.stat().st_size


@torch.no_grad()
def shard_tensors(teacher: torch.nn.Module, examples: list[data_mod.Encoded], *, top_k: int, dtype: str, vocab: int,
                  pad_id: int, batch_size: int, chunk_size: int, device: torch.device,
                  stop: Callable[[], None]) -> dict[str, torch.Tensor]:
    """The tensors of one shard (layout in `teacher_cache`'s docstring) for `examples`, in their order."""
    n_rows = [len(e.response_ids) for e in examples]
    offsets = torch.tensor([0, *n_rows]).cumsum(0)  # (E+1,)
    N = int(offsets[-1])
    ids = torch.zeros((N, top_k), dtype=torch.int32)
    logprobs = torch.zeros((N, top_k), dtype=_TORCH_DTYPES[dtype])
    tail = torch.zeros((N,), dtype=torch.float32)
    for i in range(0, len(examples), batch_size):
        stop()
        b = {k: v.to(device) for k, v in data_mod.collate_pairs(examples[i : i + batch_size], pad_id).items()}
        # rows of similar length together: less padding through the teacher, the same values per token
        for rows, p, t in length_groups(b["prompt_mask"], b["response_mask"]):
            g = take_group(b, rows, p, t)
            logits = response_logits(teacher, g, vocab=vocab)  # (b, t, V)
            top_ids, top_lp, top_tail = sparse.teacher_top_k(logits, top_k, g["response_mask"],
                                                             chunk_size=chunk_size)  # (b, t, K) x2, (b, t)
            for j, r in enumerate(rows.tolist()):
                e = i + r
                a, n = int(offsets[e]), n_rows[e]
                ids[a : a + n] = top_ids[j, :n].to("cpu", torch.int32)
                logprobs[a : a + n] = top_lp[j, :n].to("cpu", _TORCH_DTYPES[dtype])
                tail[a : a + n] = top_tail[j, :n].cpu()
    return {"ids": ids, "logprobs": logprobs, "tail": tail, "offsets": offsets.to(torch.int64),
            "index": torch.tensor([e.index for e in examples], dtype=torch.int64)}


@torch.no_grad()
def shard_answers(teacher: torch.nn.Module, examples: list[data_mod.Encoded], recipe: Recipe, tokenizer: Any,
                  device: torch.device, seed: int, stop: Callable[[], None]) -> dict[str, torch.Tensor]:
    """The tensors of one answers shard: the teacher's SeqKD answers to `examples`' prompts, in their order.

    Each shard samples from its own generator (`seed`), so a shard written after an interrupt is the
    one an uninterrupted build writes."""
    from minillm_cli.config.methods import SeqKdMethod
    from minillm_cli.methods.seqkd import sample_answers

    cfg = recipe.method if isinstance(recipe.method, SeqKdMethod) else SeqKdMethod()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    answers = sample_answers(teacher, examples, cfg, recipe.rollout, tokenizer, device, gen, stop=stop,
                             advance=lambda n: None)
    offsets = torch.tensor([0, *(len(a) for a in answers)]).cumsum(0)  # (E+1,)
    flat = [t for a in answers for t in a]
    return {"response_ids": torch.tensor(flat, dtype=torch.int32), "offsets": offsets.to(torch.int64),
            "index": torch.tensor([e.index for e in examples], dtype=torch.int64)}


def answers_seed(recipe: Recipe, shard: int) -> int:
    """The sampling seed of answers shard `shard` (from train.seed, as SeqKD's own stream)."""
    return (recipe.train.seed + 7919) * 1_000_003 + shard


def build_cache(recipe: Recipe, out: Path, *, top_k: int = 64, dtype: str = "fp16", shard_examples: int = 512,
                batch_size: int | None = None, answers: bool = False, console: Console | None = None,
                recipe_file: str | None = None) -> dict[str, Any]:
    """Build (or continue) the teacher cache of `recipe`'s training data in `out`; returns its manifest.

    `answers`: the teacher's sampled answers (SeqKD, settings from the recipe's seqkd method section
    and `rollout.*`) instead of its top-k log-probs (`top_k`, `dtype` and `batch_size` unused).

    Raises:
        UserError: no teacher, bad options, an --out holding something else, the usual data / model errors.
        RunStopped: interrupted (exit 130 / 143); the shards written so far are kept for the rerun.
    """
    console = console or Console()
    say: Callable[[str], None] = lambda s: console.print(s, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    if dtype not in cache_format.DTYPES:
        raise UserError(f"--dtype: must be one of {', '.join(cache_format.DTYPES)}, got {dtype!r}")
    if top_k < 1 and not answers:
        raise UserError(f"--top-k: must be >= 1, got {top_k}")
    if shard_examples < 1:
        raise UserError(f"--shard-examples: must be >= 1, got {shard_examples}")
    m = recipe.models
    if m.teacher is None:
        raise UserError("models.teacher: the cache needs a teacher (set it or pass --teacher)")
    if m.cross_tokenizer:
        raise UserError("models.cross_tokenizer: a teacher cache holds the teacher's ids for the student's tokenizer; "
                        "across tokenizers train method minillm, sft or seqkd with the live teacher")
    # --out is never an input of the build (the cache it continues aside), nor inside or around one
    inputs = {k: v for k, v in recipe_inputs(recipe, recipe_file).items() if k != "data.teacher_cache"}
    check_directory("--out", out, inputs)
    try:
        teacher_dir = models_mod.resolve_model(m.teacher)
    except UserError as e:
        raise UserError(f"models.teacher: {e}") from None
    student_dir = None
    if m.student is not None or m.student_init is not None:
        student_dir = prepare.resolve_models(recipe, say)[1]
    check_directory("--out", out, {"the teacher": teacher_dir, **({"the student": student_dir} if student_dir else {})})
    tokenizer = models_mod.load_tokenizer(student_dir or teacher_dir, trust_remote_code=m.trust_remote_code)
    tokenizer.padding_side = "left"
    vocab = models_mod.output_width(student_dir or teacher_dir)
    if student_dir is not None:
        models_mod.check_tokenizers(models_mod.load_tokenizer(teacher_dir, trust_remote_code=m.trust_remote_code),
                                    tokenizer, teacher_vocab=models_mod.output_width(teacher_dir), student_vocab=vocab)
    if top_k > vocab and not answers:
        raise UserError(f"--top-k: {top_k} is more than the vocabulary ({vocab} ids)")
    train, _, _, _ = data_mod.prepare_datasets(recipe.data, tokenizer, recipe.train.seed, say)
    ident = cache_format.identity(recipe, tokenizer, train, vocab, "answers" if answers else "logprobs")
    say(f"hashing the teacher's weights ({teacher_dir})")
    teacher_rec = {"path": str(teacher_dir), "sha256": cache_format.model_sha256(teacher_dir)}
    manifest = cache_format.new_manifest(ident, teacher=teacher_rec, top_k=None if answers else top_k,
                               dtype=None if answers else dtype, shard_examples=shard_examples)
    existing = check_out_dir(out, manifest)
    n_shards = manifest["shards"]
    sizes = existing.get("shard_bytes", {}) if existing is not None else {}
    todo = [i for i in range(n_shards) if cache_format.shard_problem(out / cache_format.shard_name(i), cache_format.shard_size(manifest["identity"], i),
                                                           sizes.get(cache_format.shard_name(i)))]
    if existing is not None:
        if not todo:
            say(f"teacher cache {out}: already complete ({n_shards} shards); nothing to do")
            return existing
        # the same cache, unfinished (or a shard lost since): keep what is intact, write the rest
        manifest = {**existing, "minillm_version": manifest["minillm_version"], "complete": False}
        say(f"teacher cache {out}: continuing, {n_shards - len(todo)} of {n_shards} shards already written")
    # The teacher loads before anything is written: a model that does not load leaves no directory behind.
    device = models_mod.pick_device(m.device)
    cpu_tuning.tune_for_cpu(device.type)
    t_dtype = models_mod.pick_dtype(m.dtype, device)
    teacher = models_mod.load_model(teacher_dir, dtype=t_dtype, device=device, trust_remote_code=m.trust_remote_code,
                                    allow_pickle=m.allow_pickle).requires_grad_(False).eval()
    created = _missing_dirs(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{cache_format.TMP_PREFIX}*"):  # a shard an earlier, killed build of this cache did not finish
        stale.unlink()
    write_text_atomic(out / cache_format.MANIFEST, _dump(manifest))
    bs = batch_size or recipe.train.batch_size
    t0 = time.time()
    remaining = sum(cache_format.shard_size(manifest["identity"], i) for i in todo)
    what = "answers" if answers else f"top-{top_k} log-probs"
    written = 0
    with StopSignals() as stop, Phase(f"teacher-cache: {what}", remaining, "examples", console, say) as phase:
        try:
            for i in todo:
                part = train[i * shard_examples : (i + 1) * shard_examples]
                if answers:
                    tensors = shard_answers(teacher, part, recipe, tokenizer, device, answers_seed(recipe, i),
                                            stop=stop.check)
                else:
                    tensors = shard_tensors(teacher, part, top_k=top_k, dtype=dtype, vocab=vocab,
                                            pad_id=tokenizer.pad_token_id, batch_size=bs,
                                            chunk_size=recipe.train.chunk_size, device=device, stop=stop.check)
                _write_shard(out / cache_format.shard_name(i), tensors, len(part))
                written += 1
                phase.advance(len(part))
        except BaseException as e:
            if existing is None and written == 0:  # a new cache that got nothing: leave no trace of it
                _remove_new_cache(out, created)
                if isinstance(e, KeyboardInterrupt):
                    sig = stop.received or signal.SIGINT
                    raise RunStopped(f"{signal.Signals(sig).name} received before the first shard was written; "
                                     f"nothing was written", 128 + sig) from None
            if not isinstance(e, KeyboardInterrupt):
                raise
            done = sum(cache_format.shard_problem(out / cache_format.shard_name(i), cache_format.shard_size(manifest["identity"], i)) is None
                       for i in range(n_shards))
            name = signal.Signals(stop.received or signal.SIGINT).name
            raise RunStopped(f"{name} received: {done} of {n_shards} shards of {out} are written; run the same "
                             "command again to continue", 128 + (stop.received or signal.SIGINT)) from None
    manifest["shard_bytes"] = {cache_format.shard_name(i): (out / cache_format.shard_name(i)).stat().st_size for i in range(n_shards)}
    manifest["complete"] = True
    manifest["build_s"] = round(manifest.get("build_s", 0.0) + time.time() - t0, 3)
    write_text_atomic(out / cache_format.MANIFEST, _dump(manifest))
    total = sum(manifest["shard_bytes"].values())
    held = "answers (int32 ids)" if answers else f"top-{top_k} {dtype}"
    say(f"teacher cache {out}: {ident['examples']} examples, {ident['tokens']} response tokens, {held} "
        f"({manifest['bytes_per_token']} B per token), {total / 2**20:.1f} MiB in {n_shards} shards")
    return manifest


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.absolute().parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_new_cache(out: Path, created: list[Path]) -> None:
    """Undo a new cache that failed before its first shard: its manifest, temporary shards and the
    directories this build created (only while empty: nothing else is ever deleted)."""
    (out / cache_format.MANIFEST).unlink(missing_ok=True)
    for stale in out.glob(f"{cache_format.TMP_PREFIX}*"):
        stale.unlink()
    for d in created:
        try:
            d.rmdir()
        except OSError:  # not empty (someone else wrote there): keep it
            break


def _dump(manifest: dict[str, Any]) -> str:
    import json

    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"
