"""The stepper contract: the method registry, and steppers driven alone by a small fake context.

A stepper needs only what `context.Ctx` gives it (recipe, models, tokenizer's pad id, the data
stream, `backward`, `global_sum`, `world`, `stop_requested`), so a single-process stand-in and the
tiny models of `tiny.py` are enough to check a method's step against an independent computation.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from minillm_cli.config.methods import METHOD_NAMES, KdMethod, SftMethod
from minillm_cli.config.schema import Recipe, TrainConfig
from minillm_cli.data.encoding import Encoded, collate_pairs
from minillm_cli.losses import divergences, logprobs
from minillm_cli.methods import METHODS
from minillm_cli.methods.batching import TokenMean, response_logits
from minillm_cli.methods.context import Interrupted
from minillm_cli.methods.kd import KdStepper
from minillm_cli.methods.sft import SftStepper
from tests.helpers import fake_ctx


def _examples(vocab: int, eos: int) -> list[Encoded]:
    """Four examples of different prompt and response lengths (padding on both sides)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, (p, t) in enumerate([(3, 2), (6, 4), (2, 5), (4, 1)]):
        ids = torch.randint(3, vocab, (p + t,), generator=gen).tolist()
        out.append(Encoded(prompt_ids=ids[:p], response_ids=ids[p:] + [eos], index=i))
    return out


def _ctx(models, method: Any, batch_size: int, grad_accum: int, **kw: Any) -> Any:
    student, teacher = models
    recipe = Recipe(method=method, train=TrainConfig(batch_size=batch_size, grad_accum=grad_accum, seed=0))
    return fake_ctx(recipe, student, teacher, _examples(student.config.vocab_size, student.config.eos_token_id),
                    pad_token_id=student.config.pad_token_id, **kw)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def _whole_batch(ctx: Any) -> dict[str, torch.Tensor]:
    return collate_pairs(ctx.train, ctx.tokenizer.pad_token_id)


def test_every_method_has_a_stepper_and_says_whether_it_needs_a_teacher():
    assert set(METHODS) == set(METHOD_NAMES)
    assert {name: cls.needs_teacher for name, cls in METHODS.items()} == {
        "sft": False, "kd": True, "seqkd": True, "gkd": True, "minillm": True}


def test_sft_step_is_the_token_mean_nll_of_the_whole_batch(models):
    student = models[0]
    student.zero_grad(set_to_none=True)
    ctx = _ctx(models, SftMethod(), batch_size=2, grad_accum=2)
    metrics = SftStepper(ctx).step()  # two micro-batches of two examples
    got = _grads(student)
    assert ctx.data_pos == 4

    b = _whole_batch(ctx)
    nll = -logprobs.token_logprobs(response_logits(student, b), b["response_ids"])  # (4, T)
    mask = b["response_mask"]
    expected = (nll * mask).sum() / mask.sum()
    expected.backward()
    want = _grads(student)
    assert metrics["tokens"] == int(mask.sum())
    assert metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert len(got) == len(want) and all(torch.allclose(g, w, atol=1e-6, rtol=1e-4) for g, w in zip(got, want))
    assert SftStepper(ctx).state() == ({}, {})


def test_kd_step_mixes_sft_and_the_divergence_and_ignores_the_micro_batch_split(models):
    student = models[0]
    student.zero_grad(set_to_none=True)
    method = KdMethod(kd_ratio=0.3)
    split = KdStepper(_ctx(models, method, batch_size=1, grad_accum=4)).step()
    g_split = _grads(student)
    ctx = _ctx(models, method, batch_size=4, grad_accum=1)
    whole = KdStepper(ctx).step()
    g_whole = _grads(student)

    assert split["loss"] == pytest.approx(0.7 * split["sft_loss"] + 0.3 * split["kd_loss"], rel=1e-6)
    for key in ("loss", "sft_loss", "kd_loss", "tokens"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_split, g_whole))

    b = _whole_batch(ctx)
    mask = b["response_mask"]
    with torch.no_grad():
        q, p = response_logits(student, b), response_logits(models[1], b)
        kd = (divergences.forward_kl(q, p, mask) * mask).sum() / mask.sum()
    assert whole["kd_loss"] == pytest.approx(float(kd), rel=1e-5)


def test_a_stop_request_abandons_the_step_before_any_backward(models):
    student = models[0]
    student.zero_grad(set_to_none=True)
    ctx = _ctx(models, SftMethod(), batch_size=2, grad_accum=2, stop=True)
    with pytest.raises(Interrupted):
        SftStepper(ctx).step()
    assert all(p.grad is None for p in student.parameters())


def test_token_mean_counts_every_rank_and_undoes_the_gradient_average():
    ctx = fake_ctx(Recipe(), torch.nn.Linear(1, 1), None, [], pad_token_id=0, vocab=1, world=2)
    mean = TokenMean(ctx, torch.tensor(3))  # 3 tokens here, 3 on the other rank
    assert mean.tokens == 6
    w = torch.tensor(2.0, requires_grad=True)
    mean.backward(w * 5.0, last=True, weight=0.5)  # DDP would then average over the 2 ranks
    assert float(w.grad) == pytest.approx(5.0 * 0.5 * 2 / 6)
    assert mean.value(torch.tensor(1.5)) == pytest.approx(2 * 1.5 / 6)
