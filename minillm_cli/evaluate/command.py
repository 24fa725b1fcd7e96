"""`minillm eval`: evaluate checkpoints (and optionally the teacher) side by side on the same prompts.

Protocol (algorithm.md §6; defaults of `config.EvalConfig`): sampling at T = 1, top-k 0, top-p 1,
`no_repeat_ngram_size` 6, prompts cut to their last 256 tokens, ≤ 256 new tokens, seeds 10..50;
per-seed numbers are reported as mean ± sample std over seeds. Every number is a "test" number
(held-out set given with --data), unlike the dev numbers logged during training.

Metrics (`--metrics`, default rougeL,loss plus kl,agreement with a teacher). Columns they produce:

- rougeL, em, dist4: per seed over the generated responses (×100), then mean/std over seeds.
- loss: LM loss on the first reference of each example (teacher-forced, per-sample token mean,
  then mean; no sampling, so no std). A reference is cut so that prompt + reference fits
  max_prompt_tokens + max_new_tokens (the data module's length rule).
- kl (teacher needed): fkl_student, rkl_student, fkl_teacher, rkl_teacher = KL(p‖q) and KL(q‖p) in
  nats per token, averaged over the valid tokens of student- / teacher-sampled continuations of
  each seed, then mean/std over seeds.
- agreement (teacher needed): agreement_student, agreement_teacher = top-1 agreement (%) at the
  same positions.
- exposure_bias (teacher needed): the ExAccErr(l) curve (row curves["exposure_bias"]) from the
  first seed's sampled continuations (an extra sampled pass with that seed under --greedy), and
  `exaccerr@L` at one L shared by all rows: the largest l where every row still averages at least
  half of the prompts.
- calibration (labelled data + --label-words): ece (fraction, 10 bins) and accuracy (%).

The teacher row (named "<teacher> (teacher)", first) gets the metrics that need no teacher.

Paired comparisons (`--baseline NAME`): every row saw the same prompts with the same seeds, so each
other row's difference to the baseline, per column of PAIRED_COLUMNS, gets a 95% paired bootstrap
interval (`metrics.paired_bootstrap`: 2000 resamples of the prompts with a fixed seed, the seeds of a
prompt kept together); shown as a second table ("within noise" when the interval covers 0) and
written to the JSON under "comparison". `--fail-under rougeL@baseline=0` fails a row whose interval's
lower end is below 0, i.e. that is not better than the baseline with 95% confidence.

`run_eval` reads top to bottom: options (options.py), data (dataset.py) and model paths
(checkpoints.py) are checked before any model loads; each model is scored (scoring.py); the report
(report.py) is rendered and written, and `--fail-under` checked (thresholds.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from minillm_cli import __version__
from minillm_cli.data import encoding as data_mod
from minillm_cli.errors import UserError
from minillm_cli.evaluate import report as report_mod
from minillm_cli.evaluate import report_json
from minillm_cli.evaluate.checkpoints import free, load_checkpoint, output_width
from minillm_cli.evaluate.generate import Generation
from minillm_cli.evaluate.options import (
    TEACHER_METRICS,
    EvalRequest,
    check_request,
)
from minillm_cli.evaluate.scoring import (
    EXACCERR_MIN_SHARE,
    Prompts,
    TeacherState,
    add_exaccerr,
    encode_prompts,
    evaluate_model,
    exposure_pass,
    generation_passes,
    same_vocabulary,
    teacher_cache,
)
from minillm_cli.evaluate.thresholds import check_thresholds
from minillm_cli.models import cpu_tuning
from minillm_cli.models import loading as models_mod
from minillm_cli.models.loading import eos_ids
from minillm_cli.runs.resume_check import file_sha256


def _sample_rows(name: str, tokenizer: Any, passes: list[list[Generation]], references: list[list[str]],
                 encoded: list[data_mod.Encoded]) -> list[dict[str, Any]]:
    ref_by_index = {e.index: refs for e, refs in zip(encoded, references)}
    return [
        {"model": name, "seed": g.seed, "index": g.index, "prompt": tokenizer.decode(g.prompt_ids),
         "response": g.text, "references": ref_by_index[g.index]}
        for gens in passes for g in gens
    ]


def _written(flag: str, path: str, write: Callable[[], None]) -> None:
    try:
        write()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write ({e.strerror or e})") from None


def _write_text(path: str, text: str) -> None:
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def run_eval(
    *,
    models: list[str],
    data: str,
    teacher: str | None = None,
    metrics: str | None = None,
    seeds: str | None = None,
    greedy: bool = False,
    max_samples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    label_words: str | None = None,
    json_out: str | None = None,
    samples_out: str | None = None,
    plot_out: str | None = None,
    fail_under: list[str] | None = None,
    baseline: str | Sequence[str] | None = None,
    row_metrics: dict[str, list[str]] | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
    show_tables: bool = True,
) -> int:
    """Evaluate `models` (and the teacher) on `data` and report; the engine of `minillm eval`.

    Args:
        models: Run dirs (latest step), step dirs, model dirs, .gguf files, aliases or hub ids.
        data: Evaluation file (jsonl/json/csv/parquet) or hub id (split "test").
        teacher: Optional teacher: evaluated too, and needed by kl, agreement and exposure_bias.
        metrics: Comma list (see module docstring); None = rougeL,loss (+ kl,agreement with a teacher).
        seeds: Comma list of sampling seeds (default 10,20,30,40,50).
        greedy: Greedy decoding (one pass).
        max_samples: Evaluate the first N examples only.
        max_new_tokens: New tokens per response.
        batch_size: Prompts per batch.
        label_words: Comma list of label words (calibration).
        json_out: Write the report JSON here ('-' = stdout; the table then goes to stderr).
        samples_out: Write the generations as jsonl here.
        plot_out: Write the exposure-bias PNG here (needs the exposure_bias metric).
        fail_under: `[MODEL:]METRIC=VALUE` thresholds, or `[MODEL:]METRIC@baseline=VALUE` on the lower
            end of the interval of the difference to the baseline.
        baseline: A model (as named on the command line, or the teacher) that every other row is
            compared with: per metric the difference and its 95% paired bootstrap interval. A
            sequence of names gives one comparison per baseline from the same generations (the
            first is the report's "comparison" and the one `--fail-under ...@baseline` checks; the
            JSON then also holds "comparisons": {baseline: ...} for every one).
        row_metrics: Model (as in `models`) -> a subset of the metrics for that row only, e.g. to
            skip the teacher divergences of a row nobody compares on them (they cost a teacher
            forward per sampled continuation).
        overrides: `key=value` EvalConfig overrides (positional `eval.key=value` words).
        console: Where the table and progress go (default: stdout).
        show_tables: Print the report's tables (a caller that prints its own view turns it off).

    Returns:
        0, or 1 when a --fail-under threshold is not met (the failures are printed).

    Raises:
        UserError: Any bad input (metric, data, model, option), before models are loaded where possible.
    """
    console = console or Console()
    out = Console(stderr=True) if json_out == "-" else console

    def say(text: str) -> None:
        out.print(text, highlight=False, markup=False, soft_wrap=True)

    request = check_request(models=models, data=data, teacher=teacher, metrics=metrics, seeds=seeds, greedy=greedy,
                            max_samples=max_samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            label_words=label_words, outputs={"--json": json_out, "--samples": samples_out,
                                                              "--plot": plot_out},
                            fail_under=list(fail_under or []), baseline=baseline, row_metrics=row_metrics or {},
                            overrides=overrides or [], say=say)
    device = models_mod.pick_device("auto")
    cpu_tuning.tune_for_cpu(device.type)
    dtype = models_mod.pick_dtype("auto", device)
    scored = _score(request, device, dtype, say, out)
    report = _report(request, scored, data, device, dtype)
    if show_tables:
        out.print(report_mod.render_table(report, width=out.width))
    _write_outputs(report, scored.samples, json_out, samples_out, plot_out, console, say)
    failures = check_thresholds(report, request.fail_under)
    for line in failures:
        out.print(f"[bold red]fail-under:[/] {line}", highlight=False)
    return 1 if failures else 0


@dataclass
class _Scored:
    """Every row's numbers, the generated samples and each row's prompt template."""

    rows: list[report_mod.ModelRow] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    templates: dict[str, str] = field(default_factory=dict)


def _score(request: EvalRequest, device: Any, dtype: Any, say: Callable[[str], None], out: Console) -> _Scored:
    """The teacher first (its continuations are the teacher-sampled text of every student row), then
    the students one at a time (only one student in memory)."""
    cfg, metric_names, words = request.cfg, request.metric_names, request.words
    calibrate = "calibration" in metric_names
    scored = _Scored()
    teacher_state: TeacherState | None = None
    teacher_tok: Any = None
    prompts: Prompts | None = None
    if request.teacher_spec is not None:
        spec = request.teacher_spec
        say(f"loading teacher {spec.path}")
        t_model, teacher_tok = load_checkpoint(spec, device, dtype)
        prompts = encode_prompts(teacher_tok, request.examples, cfg, words, calibrate)  # shared by all rows
        say(f"data: {prompts.summary} (template: {prompts.template})")
        row, passes = evaluate_model(spec.name, t_model, teacher_tok, prompts, cfg, metric_names, device,
                                     teacher=None, labels=request.labels, words=words, say=say, console=out)
        if any(m in metric_names for m in TEACHER_METRICS) and not passes:
            passes = generation_passes(t_model, teacher_tok, prompts, cfg, device, say, spec.name)
        sampled = exposure_pass(passes, t_model, teacher_tok, prompts, cfg, device) \
            if "exposure_bias" in metric_names else None
        width = output_width(t_model)
        teacher_state = TeacherState(model=t_model, passes=passes, sampled=sampled, width=width,
                                     logits_cache=teacher_cache(passes, cfg.max_new_tokens, width),
                                     tokenizer=teacher_tok, prompts={e.index: e.prompt_ids for e in prompts.encoded},
                                     eos=eos_ids(t_model, teacher_tok))
        scored.rows.append(row)
        scored.templates[spec.name] = prompts.template
        scored.samples += _sample_rows(spec.name, teacher_tok, passes, prompts.references, prompts.encoded)

    for spec in request.specs:
        say(f"loading {spec.path}" + (f" (LoRA on {spec.base})" if spec.base else ""))
        model, tok = load_checkpoint(spec, device, dtype)
        row_metrics = request.row_metrics.get(spec.name, metric_names)
        cross = teacher_state is not None and not same_vocabulary(teacher_tok, tok)
        if teacher_state is not None and not cross:
            models_mod.check_tokenizers(teacher_tok, tok, teacher_vocab=teacher_state.width,
                                        student_vocab=output_width(model))
            row_prompts = prompts
        else:  # its own tokenizer: its own prompts (across tokenizers the teacher metrics are text-level)
            row_prompts = encode_prompts(tok, request.examples, cfg, words, calibrate)
            say(f"data: {row_prompts.summary} (template: {row_prompts.template})")
        if cross and "agreement" in row_metrics:
            say(f"{spec.name}: another tokenizer than the teacher's: no top-1 agreement (ids cannot be compared); "
                "kl is measured on text (rkl_seq_student, fkl_seq_teacher)")
            row_metrics = [m for m in row_metrics if m != "agreement"]
        assert row_prompts is not None
        scored.templates[spec.name] = row_prompts.template
        row, passes = evaluate_model(spec.name, model, tok, row_prompts, cfg, row_metrics, device, teacher=teacher_state,
                                     labels=request.labels, words=words, say=say, console=out)
        scored.rows.append(row)
        scored.samples += _sample_rows(spec.name, tok, passes, row_prompts.references, row_prompts.encoded)
        free(model)
    if teacher_state is not None:
        free(teacher_state.model)
    return scored


def _report(request: EvalRequest, scored: _Scored, data: str, device: Any, dtype: Any) -> report_mod.EvalReport:
    """The report: the rows, the settings they were made with, and the paired comparisons."""
    import torch

    cfg = request.cfg
    n_prompts = len(request.examples)
    exaccerr_length = add_exaccerr(scored.rows, n_prompts)
    source = Path(data).expanduser()
    spec_json = lambda s: {"name": s.name, "path": str(s.path), "lora_base": str(s.base) if s.base else None}  # noqa: E731
    settings: dict[str, Any] = {
        "split": "test",
        "metrics": request.metric_names,
        "seeds": None if cfg.greedy else cfg.seeds,
        "decoding": {
            "greedy": cfg.greedy, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
            "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "max_prompt_tokens": cfg.max_prompt_tokens,
            "prompt_cut": "keep last tokens", "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
            "generator": "transformers generate",
        },
        "data": {"path": data, "sha256": file_sha256(source) if source.is_file() else None,
                 "examples": n_prompts, "max_samples": cfg.max_samples},
        "templates": scored.templates,
        "models": [spec_json(s) for s in request.specs],
        "teacher": spec_json(request.teacher_spec) if request.teacher_spec else None,
        "label_words": request.words or None,
        "exposure_bias": ({"seed": cfg.seeds[0], "length": exaccerr_length, "min_share": EXACCERR_MIN_SHARE}
                          if "exposure_bias" in request.metric_names else None),
        "units": {"rougeL": "%", "em": "%", "dist4": "%", "agreement": "%", "accuracy": "%",
                  "loss": "nats/token", "kl": "nats/token", "ece": "fraction", "exaccerr": "%"},
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "minillm_version": __version__, "torch_version": torch.__version__,
    }
    comparisons = [report_mod.compare(scored.rows, name) for name in request.baselines]
    return report_mod.EvalReport(settings=settings, rows=scored.rows, split="test",
                                 comparison=comparisons[0] if comparisons else None, more_comparisons=comparisons[1:])


def _write_outputs(report: report_mod.EvalReport, samples: list[dict[str, Any]], json_out: str | None,
                   samples_out: str | None, plot_out: str | None, console: Console, say: Callable[[str], None]) -> None:
    if json_out == "-":
        console.file.write(json.dumps(report_json.to_json(report), indent=2, allow_nan=False) + "\n")
    elif json_out is not None:
        _written("--json", json_out, lambda: report_json.write_json(report, Path(json_out).expanduser()))
        say(f"wrote {json_out}")
    if samples_out is not None:
        _write_text(samples_out, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        say(f"wrote {len(samples)} samples to {samples_out}")
    if plot_out is not None:
        _written("--plot", plot_out, lambda: report_mod.plot_exposure_bias(report, Path(plot_out).expanduser()))
        say(f"wrote {plot_out}")
