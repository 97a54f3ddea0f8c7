"""Every ```python block in README.md runs, on its own, so the documentation cannot drift.

Each block is one test case, named after the heading it sits under and its position there
(`quickstart-1`, `the-tracker-2`, ...), and runs in a fresh interpreter with a timeout: a
block must carry its own imports and set up what it uses.  A block that raises, or emits a
warning from its own code, fails.  Tracebacks give README.md's own line numbers.

Examples that are not meant to run are fenced as something else (```text, ```console,
```sh); every fence must say what it holds, so that no Python escapes by omission.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import ValkeyServer

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_INFO = {"python", "py", "python3"}
TIMEOUT = 60.0

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(?P<text>.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    info: str  # the fence's language word, "" if none
    heading: str
    index: int  # 1-based among the python blocks under the same heading
    line: int  # 1-based README line of the first line of code
    code: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-") or "top"
        return f"{slug}-{self.index}"


def blocks(text: str) -> list[Block]:
    """Every fenced block of `text`, with the heading above it."""
    found: list[Block] = []
    heading = ""
    per_heading: dict[str, int] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            heading_match = HEADING.match(lines[i])
            if heading_match:
                heading = re.sub(r"[`*]", "", heading_match["text"])
            i += 1
            continue
        fence, info = match["fence"], match["info"].lower()
        body: list[str] = []
        start = i + 2
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence))
            and lines[i].strip().strip(fence[0]) == ""
        ):
            body.append(lines[i][len(match["indent"]) :])
            i += 1
        i += 1  # the closing fence
        index = 0
        if info in PYTHON_INFO:
            per_heading[heading] = index = per_heading.get(heading, 0) + 1
        found.append(Block(info, heading, index, start, "\n".join(body) + "\n"))
    return found


ALL_BLOCKS = blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.info in PYTHON_INFO]


def test_the_readme_has_python_examples() -> None:
    assert PYTHON_BLOCKS, "no ```python block found in README.md: is the parser broken?"


def test_every_fence_names_its_language() -> None:
    bare = [b.line - 1 for b in ALL_BLOCKS if not b.info]
    assert not bare, (
        f"README.md lines {bare}: a fence without a language; write ```python for code "
        "that must run, ```text / ```console / ```sh for anything else"
    )


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path, valkey: ValkeyServer) -> None:
    # Pad with blank lines so that a traceback's line numbers are README.md's.
    script = tmp_path / "README.md.py"
    script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
    # A warning raised by the block's own code is an error (pytest's filterwarnings does not
    # reach into the subprocess); warnings from libraries it calls are reported as usual.
    cmd = [sys.executable, "-W", "error::Warning:__main__", str(script)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=tmp_path,
            env={**os.environ, "REDIS_URL": valkey.url},  # for the store's examples
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"README.md block at line {block.line} ({block.id}) ran over {TIMEOUT:.0f} s:\n"
            f"{exc.output.decode() if isinstance(exc.output, bytes) else exc.output or ''}"
        )
    if proc.returncode != 0:
        pytest.fail(
            f"README.md block at line {block.line} ({block.id}) exited {proc.returncode}:\n"
            f"{proc.stdout}",
            pytrace=False,
        )
