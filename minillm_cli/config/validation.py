"""Turning a nested dict into a `Recipe`: every problem is reported on one line with its dotted key.

Type and range errors come from the schema (`config.schema`); settings that are valid alone but not
together (a sampler MiniLLM cannot score, a teacher cache with an on-policy method, what needs a
shared vocabulary under `models.cross_tokenizer`) are checked here. This module must stay light: the
CLI imports it, and the CLI must not import torch.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from minillm_cli.config.methods import METHOD_NAMES, MiniLlmMethod
from minillm_cli.config.schema import Recipe, RolloutConfig
from minillm_cli.errors import UserError


def _check_text(tree: Any, key: str = "") -> None:
    """Every string must be valid Unicode: YAML and JSON escapes can make a lone surrogate
    (`"\\ud83d"`), which no tokenizer or file writer accepts."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_text(k, key)
            _check_text(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_text(v, f"{key}[{i}]")
    elif isinstance(tree, str):
        try:
            tree.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{key or '<recipe>'}: invalid Unicode in {tree[:40]!r} (a lone surrogate "
                            f"{tree[e.start:e.end]!r}; write the character itself)") from None


def _format_errors(err: ValidationError, raw: dict[str, Any]) -> str:
    problems = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"] if not (isinstance(x, str) and x in METHOD_NAMES and e["loc"][0] == "method")]
        key = ".".join(loc) or "<recipe>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            msg = f"method.name must be one of {', '.join(METHOD_NAMES)}"
            key = "method.name"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {_short(value)})"
        if e["type"] == "bool_as_number":  # raised for the section: the field is in its context
            key, shown = ".".join([*loc, str(e["ctx"]["key"])]), ""
        problems.append(f"{key}: {msg}{shown}")
    return "invalid recipe: " + "; ".join(problems)


def _short(value: Any, limit: int = 80) -> str:
    """repr of a user value, cut: an error line quotes it, and it may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def validate(tree: dict[str, Any]) -> Recipe:
    """Validate a nested dict into a Recipe; every problem is reported with its dotted key."""
    _check_text(tree)
    tree = dict(tree)
    if isinstance(tree.get("method"), str):
        tree["method"] = {"name": tree["method"]}
    if isinstance(tree.get("method"), dict) and "name" not in tree["method"]:
        tree["method"] = {"name": "minillm", **tree["method"]}
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_errors(e, tree)) from None
    try:
        check_combinations(recipe)
    except UserError as e:
        raise UserError(f"invalid recipe: {e}") from None
    return recipe


def check_minillm_sampler(rollout: RolloutConfig) -> None:
    """Reject sampler settings under which MiniLLM's samples and scores would disagree (see methods/minillm.py).

    Raises:
        UserError: `rollout.top_k` or `rollout.top_p` is not off, naming the key.
    """
    for key, value, off in (("top_k", rollout.top_k, 0), ("top_p", rollout.top_p, 1.0)):
        if value != off:
            raise UserError(
                f"rollout.{key}: {value} is not supported with method minillm (ids outside the cut would never "
                f"be sampled and get no gradient); use rollout.{key}={off:g}, or rollout.temperature, which "
                "trains the tempered student")


def check_combinations(recipe: Recipe) -> None:
    """Settings each valid alone but not together; raises UserError naming the key."""
    if recipe.method.name == "minillm":
        check_minillm_sampler(recipe.rollout)
    if recipe.data.teacher_cache is not None and recipe.method.name not in ("kd", "seqkd"):
        raise UserError(f"data.teacher_cache: only methods kd (cached log-probs) and seqkd (cached answers) train "
                        f"from a teacher cache (method {recipe.method.name} {CACHE_REFUSAL[recipe.method.name]}); "
                        "remove data.teacher_cache")
    if recipe.models.cross_tokenizer:
        check_cross_tokenizer(recipe)


def check_cross_tokenizer(recipe: Recipe) -> None:
    """What needs a shared vocabulary is refused with `models.cross_tokenizer` (one line each, naming the
    setting and what to use instead): anything that compares the two models' next-token distributions
    id by id, or samples ids from the teacher's.

    Raises:
        UserError: naming the key.
    """
    m, name = recipe.method, recipe.method.name
    instead = "across tokenizers use method minillm (teacher_mix 0, single_step false), sft or seqkd"
    if name in ("kd", "gkd"):
        raise UserError(f"method.name: {name} compares the teacher's and the student's next-token distributions id "
                        f"by id, which needs a shared vocabulary; {instead}")
    if recipe.data.teacher_cache is not None:
        raise UserError(f"data.teacher_cache: a teacher cache holds the teacher's ids, not text; {instead} with the "
                        "live teacher")
    if isinstance(m, MiniLlmMethod):
        refusals = [
            ("teacher_mix", m.teacher_mix > 0, "draws tokens from the teacher's distribution over the student's ids",
             "method.teacher_mix=0"),
            ("single_step", m.single_step, "is the KL of the two next-token distributions over one vocabulary",
             "method.single_step=false"),
            ("response_weight", m.response_weight > 0, "is a token-level JSD over one vocabulary",
             "method.response_weight=0"),
            ("pt_kd_ratio", m.pt_kd_ratio > 0 and recipe.data.corpus is not None and m.pt_weight > 0,
             "is the pre-training loss's teacher term, a cross-entropy over one vocabulary",
             "method.pt_kd_ratio=0 (plain language modelling on data.corpus)"),
        ]
        for key, refused, why, fix in refusals:
            if refused:
                raise UserError(f"method.{key}: {why}, which needs a shared vocabulary; with "
                                f"models.cross_tokenizer set {fix}")


CACHE_REFUSAL = {
    "sft": "uses no teacher",
    "gkd": "needs the teacher on the student's own samples, which no cache can hold",
    "minillm": "needs the teacher on the student's own samples, which no cache can hold",
}
"""Why a method other than kd cannot train from cached teacher log-probs."""

