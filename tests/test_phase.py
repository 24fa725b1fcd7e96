"""progress.Phase: long phases outside the training loop show progress with an ETA."""

from __future__ import annotations

import io
import re

from rich.console import Console

from minillm_cli.progress import Phase


def test_plain_lines_at_most_one_per_tenth_with_eta_and_a_last_line(monkeypatch) -> None:
    from minillm_cli import progress

    clock = iter(range(0, 100_000, 40))  # every call 40 s later: each tenth may print its line
    monkeypatch.setattr(progress.time, "time", lambda: float(next(clock)))
    lines: list[str] = []
    with Phase("seqkd: teacher answers", 768, "prompts", None, lines.append) as phase:
        for _ in range(48):
            phase.advance(16)
    assert lines[0] == "seqkd: teacher answers: started (768 prompts)"
    middle = lines[1:-1]
    assert 5 <= len(middle) <= 10
    assert all(re.fullmatch(r"seqkd: teacher answers: \d+/768 prompts \(elapsed \d\d:\d\d, eta \d\d:\d\d\)", m)
               for m in middle), middle
    done = [int(m.rsplit(": ", 1)[1].split("/")[0]) for m in middle]
    assert done == sorted(done) and done[0] >= 768 // 10
    assert re.fullmatch(r"seqkd: teacher answers: 768 prompts done in \d\d:\d\d", lines[-1])


def test_a_phase_of_unknown_length_says_when_it_started_and_how_long_it_took() -> None:
    lines: list[str] = []
    with Phase("converting a.gguf", None, "", None, lines.append):
        pass
    assert lines[0] == "converting a.gguf: started"
    assert re.fullmatch(r"converting a.gguf: done in \d\d:\d\d", lines[1])


def test_a_failed_phase_prints_no_done_line() -> None:
    lines: list[str] = []
    try:
        with Phase("export: verifying", None, "", None, lines.append):
            raise ValueError("boom")
    except ValueError:
        pass
    assert lines == ["export: verifying: started"]


def test_on_a_terminal_a_bar_then_one_line() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    lines: list[str] = []
    with Phase("x: divergences", 4, "passes", console, lines.append) as phase:
        for _ in range(4):
            phase.advance()
    assert lines == [lines[0]] and lines[0].startswith("x: divergences: 4 passes done in")  # no plain progress lines
    assert "x: divergences" in out.getvalue()  # the bar was drawn on the terminal


def test_a_short_phase_prints_two_plain_lines() -> None:
    """Lines between the first and the last come at most every PLAIN_LINE_SECONDS: a piped log stays short."""
    lines: list[str] = []
    with Phase("x: divergences", 4, "passes", None, lines.append) as phase:
        for _ in range(4):
            phase.advance()
    assert len(lines) == 2 and lines[0] == "x: divergences: started (4 passes)" and "done in" in lines[1]
