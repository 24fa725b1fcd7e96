"""Helpers shared by the test modules (fixtures live in conftest.py): driving the CLI and checking what
a refused command left behind, short training runs, checkpoint weights, multi-process launches.

One place for each: a test module imports from here, never another test module's private helpers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import torch
from safetensors.torch import load_file

# ------------------------------------------------------------------------------------ the CLI
FAST = ["optim.warmup_steps=1", "train.batch_size=4", "optim.lr=1e-3", "data.dev_fraction=0"]
"""Overrides that make a tiny run take a fraction of a second per step."""


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` -> sha256 of its content ('dir' for directories), lock files aside."""
    from minillm_cli.runs import rundir

    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == rundir.LOCK:  # minillm's own bookkeeping: it names whichever process last owned the run
            continue
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(*args: object) -> tuple[int, str]:
    """Run `minillm ARGS` in this process; returns (exit code, stdout + stderr)."""
    from typer.testing import CliRunner

    from minillm_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.stdout + (result.stderr if result.stderr_bytes is not None else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback instead of a message: {result.exception!r}\n{output[-2000:]}")
    return result.exit_code, output


def error_line(output: str) -> str:
    """The one error line (exactly one, no traceback, bounded in length)."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-3000:]
    assert len(lines[0]) < 1000, f"an error line of {len(lines[0])} characters"
    return lines[0]


def refused(args: Sequence[object], needle: str | list[str], root: Path, code: int = 2) -> str:
    """Run a command that must fail: exit `code`, one line naming the culprit, the tree unchanged."""
    before = tree(root)
    got, out = cli(*args)
    assert got == code, out[-3000:]
    line = error_line(out)
    for n in [needle] if isinstance(needle, str) else needle:
        assert n in line, line
    assert tree(root) == before, "the command changed the user's files"
    return line


def sft_args(student: Path | str, data: Path | str, out: Path | str, *extra: object, steps: int = 2) -> list:
    """`minillm sft` of a tiny student for `steps` steps (FAST settings)."""
    return ["sft", "--student", student, "--data", data, "-o", out, "--max-steps", steps, *FAST, *extra]


def cli_process(args: Sequence[str], env_extra: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    """`minillm ARGS` as a separate process (for signals, or a second process), output merged."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "minillm_cli.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------- training runs
TRAIN_COMMON = ["optim.warmup_steps=1", "train.batch_size=4", "train.log_every=1"]
METHOD_EXTRA = {
    "sft": ["optim.lr=1e-3"],
    "kd": ["optim.lr=1e-3", "method.loss=skew_reverse_kl"],
    "seqkd": ["optim.lr=1e-3", "method.max_new_tokens=6"],
    "gkd": ["optim.lr=1e-3", "method.max_new_tokens=6", "method.lmbda=1.0", "method.beta=0.9"],
    "minillm": ["optim.lr=1e-3", "method.max_new_tokens=6", "method.num_rollouts=8", "method.ppo_epochs=2",
                "rollout.batch_size=4"],
}
"""Per-method overrides of a few-step run on the tiny models."""


def train_tiny(tiny_dir: Path, data: Path, out: Path, method: str, steps: int, extra: Sequence[str] = (),
               resume: bool = False, extend: bool = False) -> Path:
    """Train the tiny student (teacher: the tiny teacher) in this process; returns the run directory."""
    from minillm_cli.config.loading import load_recipe
    from minillm_cli.train.loop import train

    flags = {"models.teacher": None if method == "sft" else str(tiny_dir / "teacher"),
             "models.student": str(tiny_dir / "student"), "data.train": str(data), "output.dir": str(out),
             "train.max_steps": steps}
    recipe, source = load_recipe(None, [*TRAIN_COMMON, f"method.name={method}", *extra], flags)
    return train(recipe, source, resume=resume, extend=extend)


def metrics(run: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ weights
def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a step or model directory's model.safetensors."""
    return load_file(str(model_dir / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    """Equal up to float summation order (assert)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))


# --------------------------------------------------------------------------- several processes
DISTRIBUTED_COMMON = ["optim.lr=1e-3", "optim.warmup_steps=1", "train.log_every=1", "train.threads=1",
                      "data.dev_fraction=0"]


def model_flags(tiny_dir: Path, data: Path, out: Path, method: str) -> list[str]:
    """--teacher (not for sft), --student, --data and -o of a tiny run."""
    teacher = [] if method == "sft" else ["--teacher", str(tiny_dir / "teacher")]
    return [*teacher, "--student", str(tiny_dir / "student"), "--data", str(data), "-o", str(out)]


def launch(command: str, args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`minillm COMMAND ... --num-processes N`: the CLI re-launches itself through accelerate."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "minillm_cli.cli", command, *args, "--num-processes", str(processes)],
                          capture_output=True, text=True, env=env, timeout=300)


def one_process(tiny_dir: Path, data: Path, out: Path, method: str, steps: int, extra: list[str],
                resume: bool = False) -> Path:
    """The single-process twin of a `launch`ed run (DISTRIBUTED_COMMON settings)."""
    from minillm_cli.config.loading import load_recipe
    from minillm_cli.train.loop import train

    flags = {"models.teacher": None if method == "sft" else str(tiny_dir / "teacher"),
             "models.student": str(tiny_dir / "student"), "data.train": str(data), "output.dir": str(out),
             "train.max_steps": steps}
    recipe, source = load_recipe(None, [*DISTRIBUTED_COMMON, f"method.name={method}", *extra], flags)
    return train(recipe, source, resume=resume)


# ------------------------------------------------------------------------------- steppers
class FakeAccelerator:
    """The subset of accelerate's interface that `Ctx` uses, in one process. With `num_processes` N it
    stands for N ranks that all hold the same values (a sum over ranks is N times the local value)."""

    def __init__(self, num_processes: int = 1) -> None:
        self.num_processes, self.process_index = num_processes, 0

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        return model

    def reduce(self, value: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        return value * self.num_processes


def fake_ctx(recipe: object, student: torch.nn.Module, teacher: torch.nn.Module | None, train: list, *,
             pad_token_id: int, eos_token_id: int | None = None, vocab: int | None = None,
             gen: torch.Generator | None = None, world: int = 1, stop: bool = False, tokenizer: object = None,
             teacher_tokenizer: object = None, teacher_prompts: dict[int, list[int]] | None = None) -> object:
    """A real `Ctx` for a stepper in this process: no launcher, no run directory. `tokenizer` defaults to
    one that knows only the pad and EOS ids; the teacher's side is for cross-tokenizer runs."""
    from types import SimpleNamespace

    from minillm_cli.methods.context import Ctx

    if vocab is None:
        vocab = student.get_output_embeddings().weight.shape[0]  # type: ignore[operator, union-attr]
    return Ctx(recipe=recipe, accelerator=FakeAccelerator(world), student=student, teacher=teacher,  # type: ignore[arg-type]
               tokenizer=tokenizer or SimpleNamespace(pad_token_id=pad_token_id, eos_token_id=eos_token_id),
               train=train, dev=[], corpus=None, run_dir=Path("."), device=torch.device("cpu"),
               gen=gen or torch.Generator().manual_seed(0), vocab=vocab, stop_requested=lambda: stop,
               print=lambda s: None, teacher_tokenizer=teacher_tokenizer, teacher_prompts=teacher_prompts)


def left_pad(seqs: list[list[int]], pad: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to `width` (default: the longest): (ids, attention mask), both (B, width)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


class PrefixTableLM(torch.nn.Module):
    """A causal LM with the `...ForCausalLM` call interface the sampler and the trainer use, whose
    next-token logits are a free table row per prefix of real tokens (enumerable worlds).

    logits(prefix) = table[row(prefix)], the prefix being the real (attention-mask 1) tokens so far;
    a prefix not in `prefixes` reads the last row. The "KV cache" is the (B, C) ids fed so far, and
    every call reads the prefix through the whole attention mask, as attention does: a padded row, or a
    column masked after it was fed (a rejected speculative draft), is not seen. Position ids are ignored.
    """

    def __init__(self, prefixes: list[tuple[int, ...]], vocab: int, seed: int, scale: float) -> None:
        super().__init__()
        from types import SimpleNamespace

        self._ns = SimpleNamespace
        self.base = vocab + 1  # prefix codes: base-(V+1) digits tok+1, so that no two prefixes share a code
        self.rows = {p: i for i, p in enumerate(prefixes)}
        order = sorted(self.rows, key=self.code)
        self.register_buffer("sorted_codes", torch.tensor([self.code(p) for p in order]), persistent=False)
        self.register_buffer("sorted_rows", torch.tensor([self.rows[p] for p in order]), persistent=False)
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(scale * torch.randn(len(prefixes) + 1, vocab, generator=gen))
        self.embed = torch.nn.Embedding(1, 1).requires_grad_(False)  # tells the sampler the device

    def code(self, seq: tuple[int, ...]) -> int:
        c = 0
        for tok in seq:
            c = c * self.base + tok + 1
        return c

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                **kwargs: object) -> object:
        B, L = input_ids.shape
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        ids = torch.cat([past, input_ids], 1) if past is not None else input_ids  # (B, C + L) every fed id
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)  # (B, C + L)
        codes = torch.zeros(B, dtype=torch.long)
        cols = []
        for j in range(ids.shape[1]):
            codes = torch.where(mask[:, j].bool(), codes * self.base + ids[:, j] + 1, codes)
            cols.append(codes)
        c = torch.stack(cols[-L:], 1)  # (B, L) prefix codes after each new column
        pos = torch.searchsorted(self.sorted_codes, c).clamp_max(self.sorted_codes.numel() - 1)
        found = self.sorted_codes[pos] == c
        idx = torch.where(found, self.sorted_rows[pos], self.table.shape[0] - 1)  # (B, L); unknown: last row
        logits = self.table[idx]  # (B, L, V)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return self._ns(logits=logits, past_key_values=ids if use_cache else None, cache=None)


# --------------------------------------------------------------------- statistics of gradient tests
def z_bound(components: int, k: int, family_error: float = 1e-3) -> float:
    """Bonferroni bound on max |z| over `components` at `family_error`, for t with k-1 dof.

    Normal quantile, then the Cornish-Fisher expansion of Student's t quantile to second order in 1/ν.
    """
    z = NormalDist().inv_cdf(1 - family_error / (2 * components))
    nu = k - 1
    return z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)


def z_scores(samples: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """(D,) (mean − expected) / standard error over the (K, D) samples, on components that vary."""
    se = samples.std(0) / math.sqrt(samples.shape[0])
    live = se > 0
    assert bool((expected[~live].abs() < 1e-7).all()), "a component without spread has a nonzero expectation"
    return (samples.mean(0)[live] - expected[live]) / se[live]


def check_match(samples: torch.Tensor, expected: torch.Tensor) -> float:
    z = z_scores(samples, expected)
    bound = z_bound(z.numel(), samples.shape[0])
    rel = float((samples.mean(0) - expected).norm() / expected.norm())
    assert float(z.abs().max()) < bound, f"max |z| = {float(z.abs().max()):.2f} >= {bound:.2f}, rel err {rel:.3f}"
    return float(z.abs().max())
