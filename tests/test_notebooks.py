"""Notebooks: every one is valid nbformat JSON whose code cells compile; the CPU one runs end to end.

The GPU notebooks (Llama-3.1-8B 4-bit, Qwen2.5-7B bf16) cannot run here: no GPU in CI.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CPU_NOTEBOOK = "smollm2_cpu_sparse.ipynb"


def _python(source: str) -> str:
    """A code cell without its shell (``!pip``) and magic (``%``) lines, which are not Python."""
    return "\n".join("" if re.match(r"\s*[!%]", line) else line for line in source.splitlines())


def test_the_three_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} == {"llama3_8b_qlora_sparse.ipynb", "qwen_bf16_sparse.ipynb", CPU_NOTEBOOK}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_compiles(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    header = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and "**Needs**" in header and "**Takes**" in header
    if path.name != CPU_NOTEBOOK:
        assert "GPU" in header and "Not executed by our tests" in header
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        compile(_python(cell.source), f"{path.name}[code cell {i}]", "exec")
        assert not cell.get("outputs") and cell.get("execution_count") is None, "commit notebooks without outputs"
    sources = "\n".join(c.source for c in code)
    assert "sparse_unsloth.sparsify(model," in sources and "SparsityCallback(model)" in sources


def test_compile_check_catches_a_syntax_error():
    with pytest.raises(SyntaxError):
        compile(_python("!pip install x\nx = (1,\n"), "cell", "exec")


@pytest.mark.slow
def test_cpu_notebook_runs_end_to_end(tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(next(p for p in NOTEBOOKS if p.name == CPU_NOTEBOOK), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.output_type == "stream")
    assert "trainable params" in text
    assert re.search(r"^dense .*held-out \d+\.\d{4}\s+sparse steps 0/4$", text, re.MULTILINE), text
    assert re.search(r"^sparse .*held-out \d+\.\d{4}\s+sparse steps 4/4$", text, re.MULTILINE), text
    assert (tmp_path / "outputs" / "smollm2_cpu_sparse" / "adapter" / "adapter_config.json").is_file()
