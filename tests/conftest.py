"""Test-session defaults shared by every test.

Only environment defaults (``setdefault``: a value set by the caller wins) and the skipping of
``gpu``-marked tests. Nothing here imports huggingface_hub / transformers: tests of the Hub
must be able to set ``HF_ENDPOINT`` before huggingface_hub is first imported.
"""

import os

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

GPU_SKIP_REASON = "needs a CUDA GPU; run on the device and commit its output under benchmarks/results/"


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
