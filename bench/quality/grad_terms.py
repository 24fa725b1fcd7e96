"""Which MiniLLM term steers the student? Gradient norms of L_pg and L_reg, and their cosine, per buffer.

Reruns one MiniLLM arm of a finished quality study (same recipe, same warm-up, same seed) and, at the
first optimizer step of every rollout buffer, measures apart the gradients of the two terms the step
sums: g_pg = ∇L_pg (policy gradient, PPO-clipped, importance-weighted) and g_reg = ∇L_reg (the
single-step reverse KL over the vocabulary), both token means over that step's rows, over the
trainable parameters. Training itself is unchanged (the extra gradients consume no random numbers
and are discarded), so the run is the study's arm again.

    python bench/quality/grad_terms.py --study-dir bench/out/quality-builtin --arm minillm --steps 24

Prints one line per buffer and writes `<study-dir>/grad-terms-<arm>.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from minillm_cli.config.validation import validate
from minillm_cli.methods.batching import length_groups
from minillm_cli.methods.minillm import MiniLlmStepper


def _study_module() -> Any:
    spec = importlib.util.spec_from_file_location("quality_run", Path(__file__).with_name("run.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def term_gradients(stepper: MiniLlmStepper) -> dict[str, float]:
    """|g_pg|, |g_reg|, |g_pg + g_reg| and cos(g_pg, g_reg) on the next scheduled step of the buffer."""
    buf = stepper.buffer
    assert buf is not None and stepper.schedule
    rows = stepper.schedule[0]
    index = torch.tensor(rows, device=stepper.ctx.device)
    tokens = buf["response_mask"][index].sum().clamp_min(1)
    pg = reg = torch.zeros((), device=stepper.ctx.device)
    for g, p, t in length_groups(buf["prompt_mask"][index], buf["response_mask"][index]):
        pg_sum, reg_sum, _ = stepper.group_losses(index[g], p, t)
        pg, reg = pg + pg_sum, reg + reg_sum
    params = [q for q in stepper.ctx.student.parameters() if q.requires_grad]
    g_pg = torch.autograd.grad(pg / tokens, params, retain_graph=True, allow_unused=True)
    g_reg = torch.autograd.grad(reg / tokens, params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(q)).flatten()  # noqa: E731
                                 for g, q in zip(gs, params)])
    a, b = flat(g_pg), flat(g_reg)
    return {"pg_norm": float(a.norm()), "reg_norm": float(b.norm()), "sum_norm": float((a + b).norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "pg_loss": float(pg / tokens), "reg_loss": float(reg / tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-dir", type=Path, required=True, help="a finished quality study (run.py --out)")
    parser.add_argument("--arm", default="minillm", help="a MiniLLM arm of that study")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the arm's)")
    args = parser.parse_args(argv)
    study = _study_module()
    saved = json.loads((args.study_dir / "study.json").read_text(encoding="utf-8"))
    recipe_path = args.study_dir / args.arm / "recipe.yaml"
    if not recipe_path.is_file() or study.ARMS.get(args.arm, {}).get("name") != "minillm":
        print(f"error: {recipe_path}: not a MiniLLM arm of a study", file=sys.stderr)
        return 2
    import yaml

    tree = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    if args.steps:
        tree["train"]["max_steps"] = args.steps
    records: list[dict[str, Any]] = []
    original = MiniLlmStepper.step
    steps = [0]  # optimizer steps taken so far

    def step_with_terms(self: MiniLlmStepper) -> dict[str, float]:
        steps[0] += 1
        if not self.schedule:  # a new buffer: collect it here, measure, then let the real step train on it
            self._collect()
            records.append({"step": steps[0], **term_gradients(self)})
            print(json.dumps(records[-1]), flush=True)
        return original(self)

    MiniLlmStepper.step = step_with_terms  # type: ignore[method-assign]
    from minillm_cli.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tree["output"] = {"dir": str(Path(tmp) / "run")}
        train(validate(tree), {}, console=Console(stderr=True))
    out = args.study_dir / f"grad-terms-{args.arm}.json"
    out.write_text(json.dumps({"study": saved.get("study"), "arm": args.arm, "buffers": records}, indent=2) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
