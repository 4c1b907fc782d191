"""Every ```python block of README.md and docs/integrations.md runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"README.md": 3, "docs/integrations.md": 6}  # each file's least number of examples
BLOCKS = {name: re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(encoding="utf-8"),
                           re.S) for name in DOCS}


@pytest.mark.parametrize("name", DOCS)
def test_docs_have_examples(name):
    assert len(BLOCKS[name]) >= DOCS[name]


@pytest.mark.parametrize(("name", "index"),
                         [(name, i) for name, blocks in BLOCKS.items() for i in range(len(blocks))])
def test_doc_example_runs(name, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[name][index], f"{name} block {index}", "exec"), {})
