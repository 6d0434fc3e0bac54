"""Notebooks: every one is valid nbformat JSON whose code cells compile; the CPU one runs end to end.

The GPU notebooks (Llama-3.1-8B 4-bit, Qwen2.5-7B bf16) cannot run here: no GPU in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
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


HUB_DEFAULTS = {"llama3_8b_qlora_sparse.ipynb": "unsloth/Meta-Llama-3.1-8B-bnb-4bit",
                "qwen_bf16_sparse.ipynb": "unsloth/Qwen2.5-7B"}


@pytest.mark.parametrize("name", sorted(HUB_DEFAULTS))
def test_gpu_notebook_parameters_default_to_the_hub_and_follow_the_runner(name):
    """The parameters cell: the Hub model by default; scripts/run_gpu_notebooks.sh's variables override it."""
    nb = nbformat.read(next(p for p in NOTEBOOKS if p.name == name), as_version=4)
    tagged = {tag: [c for c in nb.cells if tag in c.metadata.get("tags", [])] for tag in ("parameters", "install")}
    assert len(tagged["parameters"]) == 1 and len(tagged["install"]) == 1
    assert all("!pip" in line for line in tagged["install"][0].source.splitlines() if not line.startswith("#"))
    cell = tagged["parameters"][0]
    assert nb.cells.index(cell) < min(nb.cells.index(c) for c in nb.cells if "from_pretrained" in c.source)
    runner = (ROOT / "scripts" / "run_gpu_notebooks.sh").read_text()
    for var in re.findall(r"SPARSE_UNSLOTH_NB_\w+", cell.source):
        assert f"{var}=" in runner, f"{var} is not set by scripts/run_gpu_notebooks.sh"

    def run(**env: str) -> list[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SPARSE_UNSLOTH_NB_")}
        proc = subprocess.run([sys.executable, "-c", cell.source + "\nprint(MODEL, STEPS)"], env=clean | env,
                              capture_output=True, text=True, check=True, timeout=60)
        return proc.stdout.split()

    model, steps = run()
    assert model == HUB_DEFAULTS[name] and int(steps) >= 10
    assert run(SPARSE_UNSLOTH_NB_MODEL="/models/smollm2", SPARSE_UNSLOTH_NB_STEPS="3") == ["/models/smollm2", "3"]


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
