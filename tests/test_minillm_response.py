"""`method.response_weight`: the variant beyond the paper that adds GKD's JSD on dataset responses to MiniLLM.

Checked with the real `MiniLlmStepper` on the tiny models of `tiny.py`: off (the default) it is the
paper's method bit for bit and draws no extra rows; on, one step's gradient is exactly the plain
MiniLLM gradient plus `w ×` the gradient of the token-mean generalized JSD(beta) computed here by hand
on the rows the term drew; the keys are validated; and a resumed run is the uninterrupted one.
"""

from __future__ import annotations

import copy
import shutil
from typing import Any

import pytest
import torch

from minillm_cli.config.loading import load_recipe
from minillm_cli.config.methods import MiniLlmMethod
from minillm_cli.config.schema import Recipe, RolloutConfig, TrainConfig
from minillm_cli.data.encoding import Encoded, collate_pairs, take_indices
from minillm_cli.errors import UserError
from minillm_cli.losses import divergences
from minillm_cli.methods.batching import response_logits
from minillm_cli.methods.minillm import MiniLlmStepper
from minillm_cli.runs.checkpoint import write_text_atomic
from tests.helpers import METHOD_EXTRA, fake_ctx, same_weights, train_tiny, weights

BATCH, ACCUM = 2, 2  # two micro-batches per optimizer step: the term's token mean spans both


def _examples(vocab: int, eos: int) -> list[Encoded]:
    """Eight rows of different prompt and response lengths (padding on both sides of every batch)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, (p, t) in enumerate([(3, 2), (6, 4), (2, 5), (4, 1), (5, 3), (2, 2), (7, 1), (3, 6)]):
        ids = torch.randint(3, vocab, (p + t,), generator=gen).tolist()
        out.append(Encoded(prompt_ids=ids[:p], response_ids=ids[p:] + [eos], index=i))
    return out


def _stepper(student: torch.nn.Module, teacher: torch.nn.Module, seed: int = 0, **method: Any) -> MiniLlmStepper:
    """A real stepper, one process: each step samples a fresh buffer of BATCH × ACCUM rollouts."""
    cfg = student.config
    recipe = Recipe(
        method=MiniLlmMethod(num_rollouts=BATCH * ACCUM, ppo_epochs=1, max_new_tokens=4, **method),
        rollout=RolloutConfig(batch_size=BATCH),
        train=TrainConfig(batch_size=BATCH, grad_accum=ACCUM, seed=seed),
    )
    ctx = fake_ctx(recipe, student, teacher, _examples(cfg.vocab_size, cfg.eos_token_id), pad_token_id=cfg.pad_token_id,
                   eos_token_id=cfg.eos_token_id, vocab=cfg.vocab_size, gen=torch.Generator().manual_seed(seed))
    return MiniLlmStepper(ctx)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _train(student: torch.nn.Module, teacher: torch.nn.Module, steps: int, **method: Any) -> tuple[MiniLlmStepper,
                                                                                                  list[dict[str, float]]]:
    """`steps` optimizer steps (SGD) of a copy of `student`; returns the stepper and the metrics."""
    stepper = _stepper(copy.deepcopy(student), teacher, **method)
    model = stepper.ctx.student
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    metrics = []
    for _ in range(steps):
        metrics.append(stepper.step())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return stepper, metrics


def test_response_weight_zero_is_the_papers_method_bit_for_bit(models):
    student, teacher = models
    default, m_default = _train(student, teacher, 2)
    zero, m_zero = _train(student, teacher, 2, response_weight=0.0, response_beta=0.9)
    on, _ = _train(student, teacher, 2, response_weight=1.0)
    params = [list(s.ctx.student.parameters()) for s in (default, zero, on)]
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[1]))
    timing = ("rollout_time", "score_time", "gen_tok_per_s", "train_time", "tok_per_s")
    assert [{k: v for k, v in m.items() if k not in timing} for m in m_default] == [
        {k: v for k, v in m.items() if k not in timing} for m in m_zero]
    assert all("resp_kd_loss" not in m for m in m_default + m_zero)
    # off: only the rollout prompts are drawn from the training stream; on: one more step's worth per step
    assert default.ctx.data_pos == zero.ctx.data_pos == 2 * BATCH * ACCUM
    assert on.ctx.data_pos == 2 * 2 * BATCH * ACCUM
    assert not all(torch.equal(a, b) for a, b in zip(params[0], params[2])), "the term changed nothing"


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_one_step_is_minillm_plus_w_times_the_jsd_of_the_drawn_rows(models, beta):
    student, teacher = models
    w = 0.7
    student.zero_grad(set_to_none=True)
    plain = _stepper(student, teacher).step()  # no optimizer step: both steppers see the same θ
    g_plain = _grads(student)

    stepper = _stepper(student, teacher, response_weight=w, response_beta=beta)
    drawn: list[list[Encoded]] = []
    draw = stepper.ctx.next_examples
    stepper.ctx.next_examples = lambda n: (drawn.append(draw(n)), drawn[-1])[1]  # type: ignore[method-assign]
    mixed = stepper.step()
    g_mixed = _grads(student)

    # The first draw is the buffer's prompts (the same rollouts as `plain`: same θ, same RNG), the
    # second the term's rows: the next BATCH × ACCUM positions of the seeded stream.
    assert len(drawn) == 2
    n = len(stepper.ctx.train)
    assert [e.index for e in drawn[1]] == take_indices(n, 0, BATCH * ACCUM, BATCH * ACCUM)
    for key in ("pg_loss", "reg_loss", "clip_frac", "reward", "rkl"):
        assert mixed[key] == plain[key], key

    # Independent reference: one whole batch of those rows, token mean over all their response tokens.
    b = collate_pairs(drawn[1], stepper.ctx.tokenizer.pad_token_id)
    logits = response_logits(student, b)  # (4, T, V)
    with torch.no_grad():
        t_logits = response_logits(teacher, b, vocab=logits.shape[-1])
    mask = b["response_mask"]  # (4, T)
    jsd = (divergences.generalized_jsd(logits, t_logits, mask, beta=beta) * mask).sum() / mask.sum()
    jsd.backward()
    g_jsd = _grads(student)

    assert mixed["resp_kd_loss"] == pytest.approx(float(jsd.detach()), rel=1e-5)
    assert mixed["loss"] == pytest.approx(plain["loss"] + w * mixed["resp_kd_loss"], rel=1e-6)
    assert any(float(g.abs().max()) > 0 for g in g_jsd)
    for got, p, j in zip(g_mixed, g_plain, g_jsd):
        assert torch.allclose(got, p + w * j, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("corpus", [False, True])
def test_only_the_steps_very_last_backward_syncs_gradients(models, corpus):
    student, teacher = models
    stepper = _stepper(student, teacher, response_weight=0.5)
    ctx = stepper.ctx
    if corpus:  # the pre-training term runs between the PG/reg micro-batches and the response term
        ctx.corpus = [[int(i) for i in e.prompt_ids + e.response_ids] for e in ctx.train]
    flags: list[bool] = []
    backward = ctx.backward
    ctx.backward = lambda loss, last: (flags.append(last), backward(loss, last))[1]  # type: ignore[method-assign]
    metrics = stepper.step()
    student.zero_grad(set_to_none=True)
    assert ("pt_loss" in metrics) == corpus and "resp_kd_loss" in metrics
    assert len(flags) > 2 and flags[-1] and flags.count(True) == 1


@pytest.mark.parametrize("override, key", [("method.response_beta=1.5", "method.response_beta"),
                                           ("method.response_beta=-0.1", "method.response_beta"),
                                           ("method.response_weight=-1", "method.response_weight")])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_recipe(None, [override])
    assert key in str(e.value) and "\n" not in str(e.value)
    recipe, _ = load_recipe(None, ["method.response_weight=0.5", "method.response_beta=1"])
    assert isinstance(recipe.method, MiniLlmMethod)
    assert (recipe.method.response_weight, recipe.method.response_beta) == (0.5, 1.0)


def test_resume_after_step_one_is_bitwise_the_uninterrupted_run(tmp_path, tiny_dir, tiny_data):
    # ppo_epochs 2 over 8 rollouts: the resume falls inside a buffer, between the term's draws.
    cadence = ["train.save_every=1", "train.keep_last=10"]
    extra = [*METHOD_EXTRA["minillm"], "method.response_weight=0.5", "method.response_beta=0.3", *cadence]
    changed = [*METHOD_EXTRA["minillm"], "method.response_weight=0.25", "method.response_beta=0.3", *cadence]
    straight = train_tiny(tiny_dir, tiny_data, tmp_path / "straight", "minillm", 2, extra)
    import json

    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "resp_kd_loss" in x] == [1, 2]
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "recipe.yaml", killed / "recipe.yaml")
    shutil.copytree(straight / "step-000001", killed / "step-000001")
    write_text_atomic(killed / "latest", "step-000001\n")
    # the term's keys are not resume-safe: changing one is refused, naming it
    with pytest.raises(UserError, match="method.response_weight"):
        train_tiny(tiny_dir, tiny_data, killed, "minillm", 2, changed, resume=True)
    train_tiny(tiny_dir, tiny_data, killed, "minillm", 2, extra, resume=True)
    assert same_weights(weights(straight / "step-000002"), weights(killed / "step-000002"))
