"""Test-session defaults shared by every test.

Environment defaults (``setdefault``: a value set by the caller wins), a temporary cache for the
session, the skipping of ``gpu``-marked tests, and the tiny saved model several CLI tests train.
Nothing here imports huggingface_hub / transformers at import time: tests of the Hub must be able
to set ``HF_ENDPOINT`` before huggingface_hub is first imported.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
# Without a GPU, Triton kernels (ours, and TRL's fused LM head, which SFTTrainer always uses)
# run through Triton's interpreter on CPU tensors. Decided before anything imports triton.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The estimators the tests build go to a cache of their own, removed at the end of the session,
# not into the user's ~/.cache/sparse_unsloth. The SmolLM2 folder converted there before (the same
# bytes every time; converting takes ~30 s) is linked in, read-only, when it is complete.
SESSION_CACHE = None
if "SPARSE_UNSLOTH_CACHE" not in os.environ:
    SESSION_CACHE = Path(tempfile.mkdtemp(prefix="sparse_unsloth-tests-"))
    os.environ["SPARSE_UNSLOTH_CACHE"] = str(SESSION_CACHE)
    _converted = Path.home() / ".cache" / "sparse_unsloth" / "smollm2-135m"
    if (_converted / "sparse_unsloth_done.json").is_file():
        (SESSION_CACHE / "smollm2-135m").symlink_to(_converted, target_is_directory=True)

GPU_SKIP_REASON = "needs a CUDA GPU; run on the device and commit its output under benchmarks/results/"


def pytest_sessionfinish(session, exitstatus):
    if SESSION_CACHE is not None:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)   # unlinks the SmolLM2 link, never follows it


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only when needed: importing torch costs a few seconds

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers) + BPE tokenizer saved as an ordinary model folder."""
    import torch
    from helpers import ARITHMETIC, tiny_lora_model, tiny_tokenizer

    tokenizer = tiny_tokenizer([r["prompt"] + r["completion"] for r in ARITHMETIC])
    model = tiny_lora_model(layers=2, hidden=64, inter=96, heads=4, kv_heads=2, vocab=len(tokenizer),
                            dtype=torch.float32).unload()   # plain weights, no LoRA layers
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def arithmetic_jsonl(tmp_path_factory):
    """The prompt/completion rows of ``helpers.ARITHMETIC`` as a .jsonl file."""
    from helpers import ARITHMETIC

    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ARITHMETIC))
    return str(path)
