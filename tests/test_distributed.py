"""Several processes on CPUs (gloo), launched by accelerate through `--num-processes`.

A 2-process run with 4 sequences per process is the same optimisation as a 1-process run with 8:
same losses, same weights (up to float summation order). MiniLLM runs on 2 processes, each with
its own samples, and resumes exactly from per-rank state files. Setup errors stop every process
before anything is written. The shipped accelerate configs are valid.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minillm_cli.config.loading import RECIPES_DIR, load_recipe
from minillm_cli.errors import UserError
from minillm_cli.runs.checkpoint import write_text_atomic
from tests.helpers import DISTRIBUTED_COMMON, launch, metrics, model_flags, one_process

MINILLM = ["method.name=minillm", "method.max_new_tokens=6", "method.num_rollouts=8", "method.ppo_epochs=2",
           "rollout.batch_size=4", "train.batch_size=2", "train.save_every=2", "train.keep_last=10"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "kd"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_dir, tiny_data, method):
    one = one_process(tiny_dir, tiny_data, tmp_path / "one", method, 3, ["train.batch_size=8"])
    two = tmp_path / "two"
    result = launch("distill" if method == "kd" else "sft",
                     [*model_flags(tiny_dir, tiny_data, two, method), "--max-steps", "3", *DISTRIBUTED_COMMON, f"method.name={method}",
                      "train.batch_size=4"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    keys = ["loss", "sft_loss", "kd_loss", "tokens"] if method == "kd" else ["loss", "tokens"]
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a[k], b[k])
    assert m1[0]["tokens"] > 8  # the global batch really has 8 sequences in both runs

    w1, w2 = load_file(str(one / "step-000003" / "model.safetensors")), load_file(str(two / "step-000003" / "model.safetensors"))
    start = load_file(str(tiny_dir / "student" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-6, rtol=1e-4), k
    assert any(not torch.equal(w1[k], start[k]) for k in w1)  # the weights did move

    step = two / "step-000003"
    assert (step / "state.safetensors").exists() and (step / "state-rank1.safetensors").exists()
    assert json.loads((step / "trainer_state.json").read_text())["world_size"] == 2
    assert not any(p.name.startswith(".tmp") for p in two.iterdir())
    # data parallel: the optimizer state is saved once, by rank 0
    assert not any(k.startswith("opt.") for k in load_file(str(step / "state-rank1.safetensors")))


@pytest.mark.slow
def test_minillm_on_two_processes_samples_per_rank_and_resumes_exactly(tmp_path, tiny_dir, tiny_data):
    args = [*DISTRIBUTED_COMMON, *MINILLM]
    straight = tmp_path / "straight"
    result = launch("distill", [*model_flags(tiny_dir, tiny_data, straight, "minillm"), "--max-steps", "4", *args])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for k in ("loss", "pg_loss", "reg_loss", "reward", "rkl", "grad_norm"):
            assert torch.isfinite(torch.tensor(r[k])), (k, r)
    # the default sampler: speculative (rollout.speculative_tokens > 0), fewer teacher calls than tokens
    fresh = [r for r in records if "rollout_time" in r]
    assert fresh and all(0 < r["draft_accept"] <= 1 and r["teacher_calls_per_token"] < 1 for r in fresh), fresh

    # each rank has its own sampling stream: different RNG states and different rollouts
    step2 = straight / "step-000002"
    r0, r1 = load_file(str(step2 / "state.safetensors")), load_file(str(step2 / "state-rank1.safetensors"))
    assert not torch.equal(r0["rng.sampling"], r1["rng.sampling"])
    assert r0["buf.response_ids"].shape[0] == r1["buf.response_ids"].shape[0] == 4  # 8 rollouts over 2 ranks
    assert not torch.equal(r0["buf.prompt_ids"], r1["buf.prompt_ids"])

    # a run killed after its step-2 checkpoint, resumed on 2 processes, ends bit-identical
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "recipe.yaml", killed / "recipe.yaml")
    shutil.copytree(step2, killed / "step-000002")
    write_text_atomic(killed / "latest", "step-000002\n")
    result = launch("distill", [*model_flags(tiny_dir, tiny_data, killed, "minillm"), "--max-steps", "4", "--resume", *args])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a = load_file(str(straight / "step-000004" / "model.safetensors"))
    b = load_file(str(killed / "step-000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the same checkpoint cannot be resumed by a different number of processes
    with pytest.raises(UserError, match="saved by 2"):
        one_process(tiny_dir, tiny_data, killed, "minillm", 6, MINILLM[:-2], resume=True)


@pytest.mark.slow
def test_setup_error_stops_every_process_before_writing(tmp_path, tiny_dir):
    out = tmp_path / "run"
    result = launch("sft", ["--student", str(tiny_dir / "student"), "--data", str(tmp_path / "missing.jsonl"),
                             "-o", str(out), "--max-steps", "2", *DISTRIBUTED_COMMON])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("error:") == 1 and "missing.jsonl" in output  # one message, from rank 0
    assert not out.exists()


def test_ranks_agree_on_an_error_of_one_rank(monkeypatch):
    import accelerate.utils

    from minillm_cli.parallel.distributed import agree_on_setup

    class TwoRanks:
        num_processes = 2

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [None, "UserError: data.train: bad file"])
    with pytest.raises(UserError, match="^rank 1: data.train: bad file$"):
        agree_on_setup(TwoRanks(), None)  # rank 0 itself was fine
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [None, "OSError: disk gone"])
    with pytest.raises(UserError, match="rank 1: OSError: disk gone"):
        agree_on_setup(TwoRanks(), None)
    with pytest.raises(ValueError, match="mine"):  # the failing rank re-raises its own error
        agree_on_setup(TwoRanks(), ValueError("mine"))
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [None, None])
    agree_on_setup(TwoRanks(), None)


def test_teacher_on_the_cpu_gives_the_same_run(tmp_path, tiny_dir, tiny_data, monkeypatch):
    """`teacher_placement: cpu` runs the teacher through a device-moving hook (a no-op move here)."""
    from minillm_cli.train import prepare

    hooked = []
    real = prepare.outputs_to_caller
    monkeypatch.setattr(prepare, "outputs_to_caller", lambda model, device: (hooked.append(device), real(model, device)))
    extra = ["train.batch_size=4", "method.max_new_tokens=6", "method.num_rollouts=8", "method.ppo_epochs=1",
             "rollout.batch_size=4"]
    shared = one_process(tiny_dir, tiny_data, tmp_path / "shared", "minillm", 2, extra)
    assert hooked == []
    cpu = one_process(tiny_dir, tiny_data, tmp_path / "cpu", "minillm", 2, [*extra, "models.teacher_placement=cpu"])
    assert hooked == [torch.device("cpu")]
    losses = [r["loss"] for r in metrics(cpu)]
    assert len(losses) == 2 and losses == [r["loss"] for r in metrics(shared)]


@pytest.mark.parametrize("placement, needle", [
    ("sharded", "needs an FSDP launch"),
    ("device:0", "needs accelerators"),
])
def test_teacher_placements_that_need_gpus_are_refused_before_writing(tmp_path, tiny_dir, tiny_data, placement, needle):
    with pytest.raises(UserError, match=needle):
        one_process(tiny_dir, tiny_data, tmp_path / "run", "kd", 1, [f"models.teacher_placement={placement}"])
    assert not (tmp_path / "run").exists()


def test_teacher_placement_is_validated():
    with pytest.raises(UserError, match="models.teacher_placement"):
        load_recipe(None, ["models.teacher_placement=gpu7"])
    for ok in ("shared", "sharded", "cpu", "device:1"):
        assert load_recipe(None, [f"models.teacher_placement={ok}"])[0].models.teacher_placement == ok


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_shipped_accelerate_configs_are_valid(name, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = RECIPES_DIR / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))  # unknown keys are errors here
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "4", "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 4
    if name == "ddp":
        assert args.multi_gpu and config.mixed_precision == "no"
    if name == "fsdp":
        from accelerate.utils.launch import prepare_multi_gpu_env

        env = prepare_multi_gpu_env(args)
        assert args.use_fsdp and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
        assert env["FSDP_VERSION"] == "2" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_OFFLOAD_PARAMS"] == "false"
        from minillm_cli.parallel.fsdp import fsdp_settings

        for k, v in env.items():
            if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
                monkeypatch.setenv(k, v)
        assert fsdp_settings() is not None  # every key of the shipped config is one minillm implements
    if name == "zero3":
        assert args.use_deepspeed and int(args.zero_stage) == 3
        assert int(args.gradient_accumulation_steps) == 1 and float(args.gradient_clipping) == 1.0
        assert str(args.zero3_save_16bit_model).lower() == "true"
    from minillm_cli.commands.plan import sharding_of

    assert sharding_of(path) == {"ddp": "none", "fsdp": "fsdp", "zero3": "zero3"}[name]
