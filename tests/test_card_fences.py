"""A model card's code blocks hold whatever the inputs' names hold: no name can close them early.

CommonMark closes a fenced block at a line of at least as many backticks as opened it, indented
by at most three spaces; a code span ends at the next run of exactly its own length. The card
uses fences and spans longer than any run inside, and shell-quotes the reproduce command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.card import CardContent, code_span, fenced, merge_card, render_card
from mergekit_like.merge.recipe import recipe_from_cli

runner = CliRunner()
HOSTILE = "nl2/x\n```\n# FENCE\n```\ny"
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def blocks_and_headings(card: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(info string, lines) of each fenced block and the ATX headings outside them, as CommonMark reads the body."""
    body = card.split("\n---\n", 1)[1]  # after the YAML front matter
    blocks: list[tuple[str, list[str]]] = []
    headings: list[str] = []
    opened: tuple[str, int] | None = None
    for line in body.splitlines():
        found = FENCE.match(line)
        if opened is not None:
            char, length = opened
            if found and found.group(1)[0] == char and len(found.group(1)) >= length and not found.group(2).strip():
                opened = None
            else:
                blocks[-1][1].append(line)
            continue
        if found and not (found.group(1)[0] == "`" and "`" in found.group(2)):
            opened = (found.group(1)[0], len(found.group(1)))
            blocks.append((found.group(2).strip(), []))
        elif re.match(r"^ {0,3}#{1,6}(\s|$)", line):
            headings.append(line.strip())
    assert opened is None, "a block is left open"
    return blocks, headings


def test_a_fence_is_longer_than_every_backtick_run_inside() -> None:
    assert fenced("plain", "bash") == ["```bash", "plain", "```"]
    assert fenced("a\n```\nb", "yaml") == ["````yaml", "a\n```\nb", "````"]
    assert fenced("``````", "") == ["```````", "``````", "```````"]


def test_a_code_span_is_longer_than_every_backtick_run_inside() -> None:
    assert code_span("models/a") == "`models/a`"
    assert code_span("a`b") == "``a`b``"
    assert code_span("`edge``") == "``` `edge`` ```"


def test_a_path_with_a_fence_and_newlines_adds_no_heading_to_a_merge_card() -> None:
    recipe = recipe_from_cli("linear", [HOSTILE, "models/b"], params=["weight=1,1"])
    card = merge_card(recipe, title="out", has_config=False, command="mergekit-like merge merge_recipe.yml OUTPUT")
    blocks, headings = blocks_and_headings(card)
    assert headings == ["# out", "## Inputs", "## Recipe", "## Reproduce"]
    assert [info for info, _ in blocks] == ["yaml", "bash"]
    assert "models:" in "\n".join(blocks[0][1]) and "# FENCE" in "\n".join(blocks[0][1])
    assert "- `nl2/x\\n```\\n# FENCE\\n```\\ny` (local)" not in card  # a span closed by the path's own run
    assert "- ````nl2/x\\n```\\n# FENCE\\n```\\ny```` (local)" in card


def test_every_block_of_a_card_survives_a_hostile_recipe_value_and_command() -> None:
    command = shlex.join(["mergekit-like", "average", HOSTILE, "-o", "OUTPUT"])
    card = render_card(CardContent(
        title="t", method="swa", paper="https://example.org", description="d", inputs=[(HOSTILE, "step 1")],
        recipe={"checkpoints": [HOSTILE, "~~~\n`````"]}, has_config=False, command=command,
    ))
    blocks, headings = blocks_and_headings(card)
    assert headings == ["# t", "## Inputs", "## Recipe", "## Reproduce"]
    (_, reproduce) = blocks[1]
    assert shlex.split("\n".join(reproduce)) == ["mergekit-like", "average", HOSTILE, "-o", "OUTPUT"]


def test_average_card_of_a_path_holding_a_fence_reproduces_it(tmp_path: Path) -> None:
    hostile = tmp_path / HOSTILE
    write_checkpoint(hostile, {"w": torch.ones(2)})
    other = write_checkpoint(tmp_path / "other", {"w": torch.full((2,), 3.0)})
    out = tmp_path / "out"
    result = runner.invoke(app, ["average", str(hostile), str(other), "-m", "swa", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    blocks, headings = blocks_and_headings((out / "README.md").read_text())
    assert "# FENCE" not in headings
    assert headings[1:] == ["## Inputs", "## Recipe", "## Reproduce"]
    reproduce = dict(blocks)["bash"]
    words = shlex.split("\n".join(reproduce))
    assert words[:2] == ["mergekit-like", "average"] and str(hostile) in words
