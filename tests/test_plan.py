"""The memory plan: exact parameter counts, activation sizes as autograd keeps them, the effect of
sharding and processes, the paper recipe's documented hardware, the CLI, and a measured CPU peak."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from minillm_cli.cli import app
from minillm_cli.commands.plan import GiB, fits, parse_size, plan_memory, suggestions
from minillm_cli.config.loading import RECIPES_DIR, load_recipe
from minillm_cli.errors import UserError
from minillm_cli.models.shapes import model_shape, shape_from_config

runner = CliRunner()


def _tiny_classic(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                          bos_token_id=0, eos_token_id=0))
    return OPTForCausalLM(OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128))


def test_parameter_counts_are_exact(tiny_dir):
    from transformers import AutoModelForCausalLM

    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir / name)
        assert model_shape(str(tiny_dir / name)).params == sum(p.numel() for p in model.parameters())
    for kind in ("gpt2", "opt"):
        model = _tiny_classic(kind)
        assert shape_from_config(model.config.to_dict(), kind).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, billions", [("llama-7b", 6.738), ("llama-13b", 13.016), ("gpt2", 0.1244),
                                            ("gpt2-xl", 1.5576), ("facebook/opt-1.3b", 1.3158),
                                            ("smollm2-135m-instruct", 0.1345)])
def test_known_models_plan_offline(name, billions):
    assert model_shape(name).params / 1e9 == pytest.approx(billions, rel=1e-3)


def test_unreadable_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="some-org/some-model: cannot read its config.json offline"):
        model_shape("some-org/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        model_shape(str(tmp_path / "empty"))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_activation_estimate_matches_what_autograd_keeps(kind):
    """Bytes of the tensors saved for backward (saved-tensor hooks) vs the plan's per-block formula."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind == "llama":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4))
    else:
        model = _tiny_classic(kind)
    for m in model.modules():  # the training loop turns dropout off too
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    B, L = 4, 48
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 320, (B, L))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=2)
    shape = shape_from_config(model.config.to_dict(), kind)
    estimate = B * L * shape.layers * shape.activation_elements() * 4
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.15)


def _recipe(*over: str, method: str = "minillm"):
    flags = {"models.teacher": "llama-13b", "models.student": "llama-7b"}
    return load_recipe(None, [f"method.name={method}", "models.dtype=bf16", *over], flags)[0]


def test_sharding_and_processes_divide_what_they_should():
    r = _recipe("method.num_rollouts=256", "method.max_new_tokens=256")
    one = plan_memory(r)
    ddp = plan_memory(r, num_processes=16)
    fsdp = plan_memory(r, num_processes=16, sharding="fsdp")
    p7 = model_shape("llama-7b").params
    assert one.part("student weights") == ddp.part("student weights") == p7 * 2
    assert one.part("optimizer (AdamW)") == 2 * p7 * 2  # torch keeps AdamW moments in the bf16 parameter dtype
    assert one.part("DDP gradient buckets") == 0 and ddp.part("DDP gradient buckets") == p7 * 2
    assert fsdp.part("optimizer (AdamW)") == 2 * p7 * 4 / 16
    assert fsdp.part("gradients") == p7 * 4 / 16
    assert one.part("teacher weights") == fsdp.part("teacher weights") == model_shape("llama-13b").params * 2
    # the MiniLLM teacher-logit buffer: num_rollouts / processes × max_new_tokens × V × 2 bytes
    assert one.part("rollout buffer") == pytest.approx(256 * 256 * 32000 * 2, rel=0.01)
    assert ddp.part("rollout buffer") == pytest.approx(16 * 256 * 32000 * 2, rel=0.01)
    assert fsdp.part("sampling copy of the student") == p7 * 2 and ddp.part("sampling copy of the student") == 0
    # activation checkpointing keeps only block inputs
    full = plan_memory(r, activation_checkpointing=False).part("activations")
    ckpt = plan_memory(r, activation_checkpointing=True).part("activations")
    assert ckpt < full / 5
    kd = plan_memory(_recipe("models.teacher_placement=cpu", method="kd"))
    assert kd.part("teacher weights") == 0 and kd.host_bytes == model_shape("llama-13b").params * 2
    assert kd.part("rollout buffer") == 0


def test_plan_suggests_what_makes_it_fit():
    r = _recipe("method.num_rollouts=256", "method.max_new_tokens=256")
    plan = plan_memory(r, num_processes=8)
    assert not fits(plan, parse_size("80GB"))
    tips = suggestions(r, plan, parse_size("80GB"))
    assert tips and any("sharding fsdp" in t for t in tips)
    for tip in tips:
        assert float(re.search(r"([\d.]+) GiB", tip).group(1)) <= 72.0


def test_paper_recipe_documents_the_current_plan():
    """The 13B -> 7B recipe's header lists per-GPU totals; they must match what the plan says now."""
    path = RECIPES_DIR / "paper" / "llama-13b-to-7b.yaml"
    recipe, _ = load_recipe(path)
    lines = re.findall(r"^#\s+(\d+) GPUs?,\s+sharding (\w+)\s*:\s+([\d.]+) GiB per GPU", path.read_text(), re.M)
    assert len(lines) >= 4
    for processes, sharding, documented in lines:
        total = plan_memory(recipe, num_processes=int(processes), sharding=sharding).total / GiB
        assert f"{total:.1f}" == documented, (processes, sharding, total)


def test_parse_size():
    assert parse_size("80GB") == parse_size("80 GiB") == 80 * GiB
    assert parse_size("512m") == 512 * 1024**2
    with pytest.raises(UserError, match="--device-memory"):
        parse_size("lots")


def test_cli_plan_and_dry_run(tmp_path, tiny_dir, tiny_data):
    result = runner.invoke(app, ["plan", "paper/llama-13b-to-7b", "--num-processes", "16", "--sharding", "fsdp",
                                 "--device-memory", "80GB"])
    assert result.exit_code == 0, result.output
    assert "teacher weights" in result.output and "fits" in result.output
    result = runner.invoke(app, ["plan", "paper/llama-13b-to-7b", "--device-memory", "80GB"])
    assert result.exit_code == 1 and "does not fit" in result.output and "try" in result.output
    result = runner.invoke(app, ["plan", "method.name=kd", "--teacher", "nope-org/nope", "--student", "llama-7b"])
    assert result.exit_code == 2 and "nope-org/nope" in result.output
    result = runner.invoke(app, ["plan", "paper/llama-13b-to-7b", "--sharding", "zero2"])
    assert result.exit_code == 2 and "--sharding" in result.output
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student"),
                                 "--data", str(tiny_data), "-o", str(out), "--dry-run", "--num-processes", "2"])
    assert result.exit_code == 0, result.output
    assert "memory per device" in result.output and "2 process(es)" in result.output
    assert not out.exists()


CHILD = r"""
import json, sys
import torch, transformers, accelerate  # the same libraries in both processes
from minillm_cli.data import encoding as data
from minillm_cli.models import loading as models
from minillm_cli.config.loading import load_recipe
from minillm_cli.train.loop import train

mode, root, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
flags = {"models.student": f"{root}/student", "data.train": f"{root}/train.jsonl", "output.dir": f"{root}/run",
         "train.max_steps": 2}
recipe, source = load_recipe(None, over, flags)
if mode == "baseline":  # everything but training: libraries, tokenizer, weights, data
    tok = models.load_tokenizer(f"{root}/student")
    model = models.load_model(f"{root}/student", dtype=torch.float32, device=torch.device("cpu"))
    data.prepare_datasets(recipe.data, tok, 0, lambda s: None)
else:
    train(recipe, source)
# VmHWM, not getrusage's ru_maxrss: Linux carries the RSS of the process before execve into ru_maxrss,
# so a child forked from a large test process would report the parent's size (every child the same).
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"maxrss": int(hwm.split()[1]) * 1024}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_plan_is_within_a_stated_factor_of_the_measured_cpu_peak(tmp_path):
    """Peak RSS of a 2-step SFT run minus a process that only loads libraries, weights and data,
    against the plan's total minus the weights. Measured here: 1.0-1.25× the plan, varying by run (the CPU
    allocator keeps freed blocks; checkpoint writing copies the optimizer state). Stated factor:
    the measurement lies within 0.5×-2× of the plan."""
    from tests.tiny import make_llama, make_tokenizer

    make_tokenizer(tmp_path / "tok")
    make_llama(tmp_path / "student", tmp_path / "tok", layers=4, hidden=512, heads=8, seed=2)
    words = "the quick brown fox jumps over the lazy dog and sorts apple banana cherry".split()
    rows = [{"instruction": " ".join(words[(i + j) % 14] for j in range(30)), "input": "",
             "output": " ".join(words[(3 * i + j) % 14] for j in range(300))} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Long rows: every sequence is cut to exactly max_total_tokens, as the plan assumes.
    over = ["method.name=sft", "models.dtype=fp32", "train.batch_size=8", "data.max_prompt_tokens=8",
            "data.max_total_tokens=128", "data.dev_fraction=0", "optim.warmup_steps=0", "train.threads=1"]

    def peak(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp_path), json.dumps(over)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["maxrss"]

    measured = peak("train") - peak("baseline")
    flags = {"models.student": str(tmp_path / "student"), "data.train": str(tmp_path / "train.jsonl")}
    plan = plan_memory(load_recipe(None, over, flags)[0])
    planned = plan.total - plan.part("student weights")
    assert planned > 200 * 1024**2  # the training state dominates the noise of a Python process
    assert 0.5 <= measured / planned <= 2.0, (measured / 2**20, planned / 2**20)
