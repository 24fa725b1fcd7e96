"""Teacher caches: `minillm teacher-cache` and `method: kd` trained from cached top-k log-probs.

The sparse divergence is the exact divergence of the (k + 1)-outcome coarse-grained distributions,
equals the dense one at k = V, and bounds it from below at k < V; a cache is written shard by shard,
continues after an interrupt, never replaces another; a run from a cache with k = V trains like a
live-teacher run, refuses a cache that does not match it, resumes exactly and runs on 2 processes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from minillm_cli.commands.teacher_cache import build_cache
from minillm_cli.config.loading import load_recipe
from minillm_cli.config.methods import KdMethod
from minillm_cli.data import cache_format
from minillm_cli.data import teacher_cache as tc
from minillm_cli.errors import RunStopped, UserError
from minillm_cli.losses import divergences
from minillm_cli.losses import sparse as sparse_mod
from minillm_cli.methods.kd import divergence
from minillm_cli.runs.checkpoint import write_text_atomic
from minillm_cli.train.loop import train
from tests.helpers import weights

LOSSES = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd", "jsd"]
COMMON = ["optim.lr=1e-3", "optim.warmup_steps=1", "train.batch_size=4", "train.log_every=1", "data.dev_fraction=0",
          "method.name=kd", "data.max_total_tokens=40", "data.max_prompt_tokens=30"]
V = 320  # the tiny tokenizer's vocabulary (tests/tiny.py): k = V keeps every id


def _logits(seed: int, B: int = 3, T: int = 7, V: int = 13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=gen) * 2
    t = torch.randn(B, T, V, generator=gen) * 3
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 0] = 0
    return s, t, mask


# ------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk", [None, 2])
def test_sparse_divergence_with_every_id_is_the_dense_one(loss, chunk):
    s, t, mask = _logits(0)
    s[0, 1, 3] = -float("inf")  # a cut student id and garbage at a masked position are fine
    s[1, 5] = float("nan")
    s.requires_grad_(True)
    ids, logp, tail = sparse_mod.teacher_top_k(t, t.shape[-1], mask, chunk_size=chunk)
    cfg = KdMethod(loss=loss, skew_alpha=0.2, jsd_beta=0.3)
    sparse = sparse_mod.sparse_divergence(s, ids, logp, tail, mask, loss=loss, alpha=0.2, beta=0.3, chunk_size=chunk)
    dense = divergence(cfg, s, t, mask, chunk_size=chunk or 128)
    torch.testing.assert_close(sparse, dense, atol=2e-6, rtol=1e-5)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), s)
    (g_dense,) = torch.autograd.grad(dense.sum(), s)
    torch.testing.assert_close(g_sparse, g_dense, atol=2e-6, rtol=1e-5)
    assert torch.isfinite(g_sparse).all()
    assert (sparse[mask == 0] == 0).all() and (g_sparse[mask == 0] == 0).all()


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "tvd"])
def test_sparse_divergence_is_that_of_the_coarse_grained_distributions(loss):
    s, t, mask = _logits(1)
    k = 4
    ids, logp, tail = sparse_mod.teacher_top_k(t, k, mask, chunk_size=3)
    got = sparse_mod.sparse_divergence(s, ids, logp.half(), tail, mask, loss=loss, chunk_size=3)  # fp16 storage
    # by hand, in float64: k cached ids + one bucket for the rest, for both distributions
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p_c = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    want = {"forward_kl": (p_c * (p_c / q_c).log()).sum(-1), "reverse_kl": (q_c * (q_c / p_c).log()).sum(-1),
            "tvd": 0.5 * (p_c - q_c).abs().sum(-1)}[loss]
    want = torch.where(mask.bool(), want, 0.0)  # (masked positions hold id 0 k times: no distribution)
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)  # fp16 log-probs: ~1e-3
    # merging outcomes never increases an f-divergence: the cached loss bounds the live one from below
    dense = divergence(KdMethod(loss=loss), s, t, mask, chunk_size=3)
    assert (got <= dense + 1e-5).all() and (got < dense - 1e-3).any()


def test_teacher_top_k_holds_the_whole_distribution():
    _, t, mask = _logits(2)
    ids, logp, tail = sparse_mod.teacher_top_k(t, 5, mask, chunk_size=2)
    valid = mask.bool()
    assert ids.shape == logp.shape == (3, 7, 5) and tail.shape == (3, 7)
    assert (logp[valid][:, :-1] >= logp[valid][:, 1:]).all()  # most likely first
    torch.testing.assert_close(ids[valid], t.topk(5, -1).indices[valid])
    total = torch.logsumexp(torch.cat([logp, tail.unsqueeze(-1)], -1), -1)
    torch.testing.assert_close(total[valid], torch.zeros_like(total[valid]), atol=1e-6, rtol=0)
    assert (ids[~valid] == 0).all() and (tail[~valid] == 0).all()
    _, _, empty = sparse_mod.teacher_top_k(t, t.shape[-1], mask)
    assert (empty[valid] <= -1e29).all()  # k = V: no tail mass


def test_approximation_error_of_small_k_on_the_tiny_models(models, tiny_dir):
    """The error of the cached forward KL against the live one, as stated in the README."""
    from minillm_cli.methods.batching import response_logits

    student, teacher = models
    gen = torch.Generator().manual_seed(0)
    b = {"prompt_ids": torch.randint(3, V, (4, 6), generator=gen), "prompt_mask": torch.ones(4, 6, dtype=torch.long),
         "response_ids": torch.randint(3, V, (4, 12), generator=gen), "response_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.no_grad():
        s, t = response_logits(student, b), response_logits(teacher, b)
    mask = b["response_mask"]
    live = float(divergences.forward_kl(s, t, mask).sum())
    errors = {}
    for k in (8, 32, 128, V):
        ids, logp, tail = sparse_mod.teacher_top_k(t, k, mask)
        cached = float(sparse_mod.sparse_divergence(s, ids, logp.half() if k < V else logp, tail, mask).sum())
        errors[k] = (live - cached) / live
    assert errors[V] == pytest.approx(0.0, abs=1e-5)
    assert 0 < errors[128] < errors[32] < errors[8] < 1  # an underestimate, shrinking with k


# ------------------------------------------------------------------------------------ building
def _recipe(tiny_dir: Path, data: Path, extra: list[str] = (), out: Path | None = None, steps: int = 3,
            teacher: bool = True):
    flags = {"models.teacher": str(tiny_dir / "teacher") if teacher else None,
             "models.student": str(tiny_dir / "student"), "data.train": str(data),
             "output.dir": str(out) if out else None, "train.max_steps": steps}
    return load_recipe(None, [*COMMON, *extra], flags)


def _build(tiny_dir: Path, data: Path, out: Path, k: int = 8, dtype: str = "fp16", shard_examples: int = 7,
           extra: list[str] = ()) -> dict:
    recipe, _ = _recipe(tiny_dir, data, extra)
    return build_cache(recipe, out, top_k=k, dtype=dtype, shard_examples=shard_examples, batch_size=5)


def test_cli_builds_a_cache_with_its_manifest(tmp_path, tiny_dir, tiny_data):
    from minillm_cli import __version__
    from minillm_cli.cli import app

    out = tmp_path / "cache"
    args = ["teacher-cache", "--teacher", str(tiny_dir / "teacher"), "--data", str(tiny_data), "--out", str(out),
            "--top-k", "8", "--shard-examples", "10", "data.dev_fraction=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "52 B per token" in " ".join(result.output.split())  # K·(2 + 4) + 4 at K = 8, fp16
    manifest = json.loads((out / "manifest.json").read_text())
    ident = manifest["identity"]
    assert manifest["complete"] and manifest["shards"] == 3 and manifest["minillm_version"] == __version__
    assert ident["top_k"] == 8 and ident["dtype"] == "fp16" and ident["examples"] == 24
    assert ident["teacher"] == cache_format.model_sha256(tiny_dir / "teacher") and ident["data.template"] == "chat"
    assert ident["data.max_total_tokens"] == 512 and ident["vocab"] == V and len(ident["tokenizer"]) == 64
    assert manifest["bytes_per_token"] == 8 * (2 + 4) + 4
    shard = load_file(str(out / "shard-00000.safetensors"))
    assert shard["ids"].dtype == torch.int32 and shard["logprobs"].dtype == torch.float16
    assert shard["offsets"].tolist()[0] == 0 and shard["offsets"][-1] == shard["ids"].shape[0] == shard["tail"].shape[0]
    payload = sum(load_file(str(out / cache_format.shard_name(i)))["ids"].shape[0] for i in range(3)) * manifest["bytes_per_token"]
    assert payload == ident["tokens"] * manifest["bytes_per_token"]
    assert sum(manifest["shard_bytes"].values()) < payload + 3 * 2000  # the payload plus the shards' headers
    again = CliRunner().invoke(app, args)  # the same command on a complete cache: nothing to do
    assert again.exit_code == 0 and "already complete" in " ".join(again.output.split())


def test_cached_rows_are_the_teachers_distribution(tmp_path, tiny_dir, tiny_data, models):
    from minillm_cli.data import encoding as data_mod
    from minillm_cli.methods.batching import response_logits
    from minillm_cli.models import loading as models_mod

    out = tmp_path / "cache"
    _build(tiny_dir, tiny_data, out, k=8, dtype="fp32")
    recipe, _ = _recipe(tiny_dir, tiny_data)
    tok = models_mod.load_tokenizer(tiny_dir / "student")
    train_enc, _, _, _ = data_mod.prepare_datasets(recipe.data, tok, recipe.train.seed, lambda s: None)
    cache = tc.open_cache(recipe.model_copy(update={"data": recipe.data.model_copy(update={"teacher_cache": str(out)})}),
                          tok, train_enc, V, None)
    picked = [train_enc[3], train_enc[20]]
    T = max(len(e.response_ids) for e in picked)
    ids, logp, tail = cache.batch(picked, T, torch.device("cpu"))
    b = data_mod.collate_pairs(picked, tok.pad_token_id)
    with torch.no_grad():
        want = sparse_mod.teacher_top_k(response_logits(models[1], b), 8, b["response_mask"])
    valid = b["response_mask"].bool()
    assert torch.equal(ids.long()[valid], want[0][valid])
    torch.testing.assert_close(logp[valid], want[1][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail[valid], want[2][valid], atol=1e-5, rtol=1e-5)


def test_interrupted_build_continues_shard_by_shard(tmp_path, tiny_dir, tiny_data, monkeypatch):
    from minillm_cli.commands import teacher_cache as cmd

    straight = tmp_path / "straight"
    _build(tiny_dir, tiny_data, straight)
    real, calls, interrupt = cmd.shard_tensors, [], [True]

    def interrupted_at_the_second_shard(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2 and interrupt.pop():
            raise KeyboardInterrupt  # what the SIGINT handler raises at the next micro-batch
        return real(*args, **kwargs)

    monkeypatch.setattr(cmd, "shard_tensors", interrupted_at_the_second_shard)
    out = tmp_path / "cache"
    with pytest.raises(RunStopped, match="1 of 4 shards .* run the same command again") as stopped:
        _build(tiny_dir, tiny_data, out)
    assert stopped.value.exit_code == 130
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    # a training run refuses the incomplete cache, before it creates its run directory
    recipe, source = _recipe(tiny_dir, tiny_data, [f"data.teacher_cache={out}"], out=tmp_path / "run", teacher=False)
    with pytest.raises(UserError, match=r"incomplete \(1 of 4 shards written\)"):
        train(recipe, source)
    assert not (tmp_path / "run").exists()

    calls.clear()
    interrupt.append(False)
    (out / ".tmp-shard-00001-4242.safetensors").write_bytes(b"half")  # what a kill -9 leaves
    _build(tiny_dir, tiny_data, out)
    assert calls == [7, 7, 3]  # only the missing shards were computed (24 examples, 7 per shard)
    assert not list(out.glob(".tmp-*"))
    for i in range(4):
        a, b = load_file(str(straight / cache_format.shard_name(i))), load_file(str(out / cache_format.shard_name(i)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "manifest.json").read_text())["complete"]


@pytest.mark.slow
def test_sigint_stops_the_cli_build_and_the_same_command_continues(tmp_path, tiny_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = [{"instruction": f"Count to {n}.", "input": "", "output": " ".join(str(i) for i in range(n % 9 + 1))}
            for n in range(300)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "minillm_cli.cli", "teacher-cache", "--teacher", str(tiny_dir / "teacher"), "--data",
           str(data), "--out", str(out), "--top-k", "4", "--shard-examples", "1", "--batch-size", "1",
           "data.dev_fraction=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "shard-00002.safetensors").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    assert "SIGINT received" in output and "run the same command again" in output
    written = len(list(out.glob("shard-*.safetensors")))
    assert 3 <= written < 300 and not list(out.glob(".tmp-*"))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"{written} of 300 shards already written" in " ".join(again.stdout.split())
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_an_out_dir_holding_anything_else_is_refused(tmp_path, tiny_dir, tiny_data):
    out = tmp_path / "cache"
    _build(tiny_dir, tiny_data, out, k=8)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"^--out: .* holds another teacher cache \(top_k: 8 in the cache, 4 here\)"):
        _build(tiny_dir, tiny_data, out, k=4)
    with pytest.raises(UserError, match=r"holds another teacher cache \(data.max_total_tokens: 40 in the cache, 41"):
        _build(tiny_dir, tiny_data, out, k=8, extra=["data.max_total_tokens=41"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not a teacher cache"):
        _build(tiny_dir, tiny_data, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------ training
def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, tiny_dir, tiny_data) -> Path:
    """A cache that keeps every id (k = V) in fp32: training from it is training from the live teacher."""
    out = tmp_path_factory.mktemp("full") / "cache"
    _build(tiny_dir, tiny_data, out, k=V, dtype="fp32", shard_examples=10)
    return out


@pytest.mark.parametrize("loss", ["forward_kl", "tvd"])
def test_cached_kd_with_every_id_trains_like_the_live_teacher(tmp_path, tiny_dir, tiny_data, full_cache, loss,
                                                              monkeypatch):
    extra = [f"method.loss={loss}"]
    live = train(*_recipe(tiny_dir, tiny_data, extra, out=tmp_path / "live"))

    from minillm_cli.train import prepare

    def no_teacher(*a, **k):
        raise AssertionError("a cached run must not load the teacher")

    monkeypatch.setattr(prepare, "load_teacher", no_teacher)
    cached = train(*_recipe(tiny_dir, tiny_data, [*extra, f"data.teacher_cache={full_cache}"], out=tmp_path / "c",
                            teacher=False))
    m_live, m_cached = _metrics(live), _metrics(cached)
    assert [r["step"] for r in m_cached] == [1, 2, 3]
    assert m_cached[0]["sft_loss"] == m_live[0]["sft_loss"]  # the same student on the same rows
    for a, b in zip(m_live, m_cached):
        assert b["tokens"] == a["tokens"]
        for key in ("loss", "kd_loss", "sft_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])
    w_live, w_cached = weights(live / "step-000003"), weights(cached / "step-000003")
    for key in w_live:
        torch.testing.assert_close(w_cached[key], w_live[key], atol=1e-6, rtol=1e-5)
    meta = json.loads((cached / "step-000003" / "meta.json").read_text())
    assert meta["teacher_cache"]["top_k"] == V and meta["teacher_cache"]["dir"] == str(full_cache)


def test_cached_kd_resumes_bitwise(tmp_path, tiny_dir, tiny_data, full_cache):
    extra = [f"data.teacher_cache={full_cache}", "train.save_every=2", "train.keep_last=10",
             "method.loss=skew_reverse_kl"]
    straight = train(*_recipe(tiny_dir, tiny_data, extra, out=tmp_path / "straight", steps=4, teacher=False))
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "recipe.yaml", killed / "recipe.yaml")
    shutil.copytree(straight / "step-000002", killed / "step-000002")
    write_text_atomic(killed / "latest", "step-000002\n")
    recipe, source = _recipe(tiny_dir, tiny_data, extra, out=killed, steps=4, teacher=False)
    train(recipe, source, resume=True)
    a, b = weights(straight / "step-000004"), weights(killed / "step-000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_cache_rebuilt_in_place(tmp_path, tiny_dir, tiny_data, full_cache):
    cache = tmp_path / "cache"
    shutil.copytree(full_cache, cache)
    extra = [f"data.teacher_cache={cache}", "train.save_every=1"]
    run = train(*_recipe(tiny_dir, tiny_data, extra, out=tmp_path / "run", steps=1, teacher=False))
    shutil.rmtree(cache)
    _build(tiny_dir, tiny_data, cache, k=8, shard_examples=10)  # same data and identity, another K
    recipe, source = _recipe(tiny_dir, tiny_data, extra, out=run, steps=1, teacher=False)
    with pytest.raises(UserError, match=r"^--resume: data.teacher_cache .* changed since the run started \(top_k: "
                                        f"{V} then, 8 now\\)"):
        train(recipe, source, resume=True)


def _mismatch(tmp_path: Path, tiny_dir: Path, cache: Path) -> dict[str, tuple[list[str], str]]:
    return {
        "max lengths": (["data.max_total_tokens=39"], r"data.max_total_tokens: 40 in the cache, 39 here"),
        "template": (["data.template=instruction"], r"data.template: 'chat' in the cache, 'instruction' here"),
        "system prompt": (["data.system_prompt=Be brief."], r"data.system_prompt: None in the cache, 'Be brief.'"),
        "dev split": (["data.dev_fraction=0.1"], r"data.dev_fraction: 0.0 in the cache, 0.1 here"),
        "teacher": ([], r"the teacher's weights \(sha256\)"),
    }


@pytest.mark.parametrize("case", ["max lengths", "template", "system prompt", "dev split", "teacher",
                                  "data file", "tokenizer", "truncated shard", "missing shard", "not a cache"])
def test_a_cache_that_does_not_match_the_run_is_refused_before_training(tmp_path, tiny_dir, tiny_data, full_cache,
                                                                        case):
    cache, data, student = full_cache, tiny_data, None
    extra, needle = _mismatch(tmp_path, tiny_dir, cache).get(case, ([], ""))
    if case == "data file":
        data = tmp_path / "train.jsonl"
        data.write_text(tiny_data.read_text() + '{"instruction": "One more?", "input": "", "output": "Yes."}\n')
        needle = r"data.train \(file sha256\): '[0-9a-f]{12}…' in the cache"
    if case == "tokenizer":  # the same vocabulary, another chat template: other prompt ids
        from transformers import AutoTokenizer

        from tests.tiny import make_llama

        tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
        tok.chat_template = tok.chat_template.replace("'\n' + message['content']", "': ' + message['content']")
        tok.save_pretrained(tmp_path / "tok")
        make_llama(tmp_path / "student2", tmp_path / "tok", layers=2, hidden=32, seed=2)
        student = tmp_path / "student2"
        needle = r"the tokenizer \(sha256\)"
    if case in ("truncated shard", "missing shard", "not a cache"):
        cache = tmp_path / "cache"
        shutil.copytree(full_cache, cache)
        shard = cache / "shard-00001.safetensors"
        if case == "truncated shard":
            shard.write_bytes(shard.read_bytes()[:-100])
            needle = r"shard-00001.safetensors is truncated"
        elif case == "missing shard":
            shard.unlink()
            needle = r"shard-00001.safetensors is missing"
        else:
            (cache / "manifest.json").unlink()
            needle = r"not a teacher cache \(no manifest.json\)"
    recipe, source = _recipe(tiny_dir, data, [*extra, f"data.teacher_cache={cache}"], out=tmp_path / "run",
                             teacher=case == "teacher")
    if student is not None:
        recipe.models.student = str(student)
    if case == "teacher":  # another teacher with the same tokenizer: the student stands in for it
        recipe.models.teacher = str(tiny_dir / "student")
    with pytest.raises(UserError, match=f"^data.teacher_cache: {cache}: .*{needle}") as err:
        train(recipe, source)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


@pytest.mark.parametrize("method", ["sft", "gkd", "minillm"])
def test_other_methods_refuse_a_teacher_cache(method):
    with pytest.raises(UserError, match=f"^invalid recipe: data.teacher_cache: only methods kd .*and seqkd .*method {method}"):
        load_recipe(None, [f"method.name={method}", "data.teacher_cache=somewhere"])


def test_plan_counts_no_teacher_and_the_cache_buffers(tiny_dir, tiny_data, full_cache):
    from minillm_cli.commands.plan import plan_memory

    live, _ = _recipe(tiny_dir, tiny_data)
    cached, _ = _recipe(tiny_dir, tiny_data, [f"data.teacher_cache={full_cache}"])
    p_live, p_cached = plan_memory(live), plan_memory(cached)
    B, T = 4, 39
    assert p_live.part("teacher weights") > 0 and p_cached.part("teacher weights") == 0
    assert p_cached.part("logits (B×T×V)") == p_live.part("logits (B×T×V)") * 2 / 3  # no teacher logits
    assert p_cached.part("teacher cache buffers") == B * T * (V * (4 + 4) + 4)  # k = V, fp32, from the manifest
    unbuilt, _ = _recipe(tiny_dir, tiny_data, ["data.teacher_cache=/nonexistent/cache"])
    p = plan_memory(unbuilt)
    assert p.part("teacher cache buffers") == B * T * (64 * 6 + 4) and "not built yet" in p.notes[0]


@pytest.mark.slow
def test_cached_kd_on_two_processes_matches_one(tmp_path, tiny_dir, tiny_data, full_cache):
    from tests.helpers import launch

    extra = ["train.threads=1", f"data.teacher_cache={full_cache}"]
    one = train(*_recipe(tiny_dir, tiny_data, [*extra, "train.batch_size=8"], out=tmp_path / "one", steps=2,
                         teacher=False))
    two = tmp_path / "two"
    result = launch("distill", ["--student", str(tiny_dir / "student"), "--data", str(tiny_data), "-o", str(two),
                                 "--max-steps", "2", *COMMON, *extra, "train.batch_size=4"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for a, b in zip(_metrics(one), _metrics(two)):
        for key in ("loss", "kd_loss", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])
    w1, w2 = weights(one / "step-000002"), weights(two / "step-000002")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=2e-6, rtol=1e-4)


@pytest.mark.slow
def test_bench_smoke_compares_live_and_cached_kd(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    run = subprocess.run([sys.executable, str(repo / "bench" / "teacher_cache.py"), "--smoke", "--threads", "1",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["cache"]["build_s"] > 0 and r["cache"]["disk_bytes"] >= r["cache"]["tokens"] * r["cache"]["bytes_per_token"]
    for side in ("live", "cached"):
        assert r[side]["s_per_step"] > 0 and r[side]["rss_mib"] > 50
    assert 0 <= r["kl_live_cached"] < 1 and r["kl_live_initial"] > 0
    approx = r["approximation"]["initial/forward_kl/k=32"]
    assert 0 < approx["rel_error"] < 1 and 0 < approx["grad_cos"] <= 1
    assert "KL[live ‖ cached]" in run.stdout and "s/step" in run.stdout


# ----------------------------------------------------------------------------- seqkd answers
SEQKD = ["method.name=seqkd", "method.max_new_tokens=6", "method.batch_size=4"]


def _answers_recipe(tiny_dir: Path, data: Path, extra: list[str] = (), out: Path | None = None, teacher: bool = True):
    return _recipe(tiny_dir, data, [*SEQKD, *extra], out=out, steps=2, teacher=teacher)


@pytest.fixture(scope="module")
def answers_cache(tmp_path_factory, tiny_dir, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("answers") / "cache"
    recipe, _ = _answers_recipe(tiny_dir, tiny_data)
    build_cache(recipe, out, shard_examples=10, answers=True)
    return out


def test_answers_cache_is_seqkds_sampling_shard_by_shard(tmp_path, tiny_dir, tiny_data, answers_cache, models):
    from minillm_cli.commands.teacher_cache import answers_seed
    from minillm_cli.data import encoding as data_mod
    from minillm_cli.methods.seqkd import sample_answers
    from minillm_cli.models import loading as models_mod

    manifest = json.loads((answers_cache / "manifest.json").read_text())
    ident = manifest["identity"]
    assert manifest["complete"] and manifest["shards"] == 3 and manifest["bytes_per_token"] == 4
    assert ident["kind"] == "answers" and ident["method.max_new_tokens"] == 6 and ident["sampling.seed"] == 42
    recipe, _ = _answers_recipe(tiny_dir, tiny_data)
    tok = models_mod.load_tokenizer(tiny_dir / "student")
    train_enc, _, _, _ = data_mod.prepare_datasets(recipe.data, tok, recipe.train.seed, lambda s: None)
    gen = torch.Generator().manual_seed(answers_seed(recipe, 1))
    want = sample_answers(models[1], train_enc[10:20], recipe.method, recipe.rollout, tok, torch.device("cpu"), gen,
                          stop=lambda: None, advance=lambda n: None)
    shard = load_file(str(answers_cache / "shard-00001.safetensors"))
    got = [shard["response_ids"][a:b].tolist() for a, b in zip(shard["offsets"][:-1], shard["offsets"][1:])]
    assert got == want and all(0 < len(a) <= 6 for a in got)
    # a shard lost after the build is rewritten, identical, by the same command
    copy = tmp_path / "cache"
    shutil.copytree(answers_cache, copy)
    (copy / "shard-00001.safetensors").unlink()
    build_cache(recipe, copy, shard_examples=10, answers=True)
    assert load_file(str(copy / "shard-00001.safetensors"))["response_ids"].tolist() == shard["response_ids"].tolist()


def test_seqkd_trains_on_cached_answers_without_a_teacher(tmp_path, tiny_dir, tiny_data, answers_cache, monkeypatch):
    from minillm_cli.data.encoding import take_indices
    from minillm_cli.train import prepare

    monkeypatch.setattr(prepare, "load_teacher", lambda *a, **k: pytest.fail("a cached run must not load the teacher"))
    recipe, source = _answers_recipe(tiny_dir, tiny_data, [f"data.teacher_cache={answers_cache}"],
                                     out=tmp_path / "run", teacher=False)
    run = train(recipe, source)
    meta = json.loads((run / "step-000002" / "meta.json").read_text())
    assert meta["seqkd"] == {"responses": str(answers_cache), "count": 24, "source": "teacher-cache"}
    assert not (run / "seqkd-teacher-responses.jsonl").exists()
    answers = []
    for i in range(3):
        shard = load_file(str(answers_cache / cache_format.shard_name(i)))
        offsets = shard["offsets"].tolist()
        answers += [len(range(a, b)) for a, b in zip(offsets[:-1], offsets[1:])]
    first = take_indices(24, recipe.train.seed, 0, 4)  # the rows of step 1
    assert _metrics(run)[0]["tokens"] == sum(answers[i] for i in first)  # trained on the teacher's answers


@pytest.mark.parametrize("case", ["kd from answers", "seqkd from log-probs", "sampler"])
def test_a_cache_of_the_wrong_kind_or_sampler_is_refused(tmp_path, tiny_dir, tiny_data, answers_cache, full_cache,
                                                         case):
    if case == "kd from answers":
        recipe, source = _recipe(tiny_dir, tiny_data, [f"data.teacher_cache={answers_cache}"], out=tmp_path / "run",
                                 teacher=False)
        needle = "what the cache holds .*'answers' in the cache, 'logprobs' here"
    elif case == "seqkd from log-probs":
        recipe, source = _answers_recipe(tiny_dir, tiny_data, [f"data.teacher_cache={full_cache}"],
                                         out=tmp_path / "run", teacher=False)
        needle = "'logprobs' in the cache, 'answers' here"
    else:
        recipe, source = _answers_recipe(tiny_dir, tiny_data, [f"data.teacher_cache={answers_cache}",
                                                               "method.max_new_tokens=5"], out=tmp_path / "run",
                                         teacher=False)
        needle = "method.max_new_tokens: 6 in the cache, 5 here"
    with pytest.raises(UserError, match=f"^data.teacher_cache: .*{needle}"):
        train(recipe, source)
    assert not (tmp_path / "run").exists()
