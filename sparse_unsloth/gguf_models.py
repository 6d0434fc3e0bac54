"""Real models that come as GGUF files: dequantized once into an ordinary Hugging Face folder.

transformers reads GGUF (with the ``gguf`` package) but flags the model as quantized, which
``save_pretrained`` refuses; :func:`dequantize_gguf` copies the dequantized tensors into a clean
model and writes a bf16 folder that later loads with ``from_pretrained(folder)`` and needs
neither ``gguf`` nor a network. :func:`build_once` writes such a folder atomically into the
cache. Used by :mod:`.smollm2` and for any ``.gguf`` path given as a model (e.g. the
Qwen2.5-Coder-0.5B-Instruct GGUF rebuilt from PyPI, see ``benchmarks/NOTES.md``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["GGUF_PIP", "build_once", "default_cache_root", "dequantize_gguf", "gguf_model_path",
           "recorded_identity", "special_tokens_as_config"]

GGUF_PIP = "pip install gguf==0.19.0"
# Written last: a folder with this file is complete. Bump FORMAT to rebuild old caches (2: the
# metadata may name the model, see recorded_identity; 3: the tokenizer's eos and pad are the
# model config's, see special_tokens_as_config).
DONE = "sparse_unsloth_done.json"
FORMAT = 3
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_root() -> Path:
    """``$SPARSE_UNSLOTH_CACHE`` if set, else ``~/.cache/sparse_unsloth``."""
    env = os.environ.get("SPARSE_UNSLOTH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse_unsloth"


def is_complete(folder: Path) -> bool:
    done = folder / DONE
    if not done.is_file() or not all((folder / name).is_file() for name in REQUIRED):
        return False
    try:
        return json.loads(done.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def recorded_identity(folder: str | Path) -> tuple[str, str] | None:
    """(model id, revision) that a converted folder records as what it is, else None.

    ``from_pretrained(folder)`` names a model after the folder; this is how its estimator gets
    cached and recorded under the real model's name instead (the weights' fingerprint still
    tells converted weights from the original release).
    """
    try:
        meta = json.loads((Path(folder) / DONE).read_text())
    except (OSError, ValueError):
        return None
    model_id = meta.get("model_id") if isinstance(meta, dict) else None
    return (model_id, meta.get("revision", "")) if model_id else None


def require_gguf(what: str, pip: str = GGUF_PIP) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Converting {what} from GGUF needs the `gguf` package (only once; the "
                                  f"converted folder does not). Install it with:\n    {pip}")


def _tidy(folder: Path, name_or_path: str) -> None:
    """Config and tokenizer files as an ordinary release has them, for transformers 4.x and 5.x."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])  # transformers 4.x reads only this key
    config["_name_or_path"] = name_or_path
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_file = folder / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    for key in ("is_local", "local_files_only"):
        tok.pop(key, None)
    if int(tok.get("model_max_length") or 0) > 1_000_000:
        tok["model_max_length"] = config.get("max_position_embeddings") or 8192
    tok_file.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


def special_tokens_as_config(tokenizer, config) -> None:
    """Give ``tokenizer`` the eos and pad tokens that the model ``config`` declares.

    A GGUF file keeps one eos id for the tokenizer, and transformers' GGUF reader hands the
    tokenizer that one while the config keeps the release's. Qwen2.5-Coder-0.5B-Instruct then has
    eos = pad = ``<|endoftext|>`` in the tokenizer, but eos ``<|im_end|>`` and pad
    ``<|endoftext|>`` in its config and its original release. TRL would end completions with the
    wrong token, and Unsloth refuses a pad equal to eos (it tries to add a new pad token and then
    raises).
    """
    for role in ("eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, (list, tuple)):
            token_id = token_id[0] if token_id else None  # several stop ids: the first is the model's eos
        if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def dequantize_gguf(gguf: Path, out: Path, name_or_path: str) -> None:
    """Write the model of ``gguf`` as a bf16 Hugging Face folder ``out`` (``_name_or_path`` set)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name,
              "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    quantized = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # A model loaded from GGUF remembers it was "quantized" (config + hf_quantizer) and
    # save_pretrained refuses it; copy its tensors into a fresh model built from a clean config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion of {gguf.name}: missing weights {missing}, unexpected weights "
                           f"{result.unexpected_keys}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    del quantized
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    special_tokens_as_config(tokenizer, model.config)
    tokenizer.save_pretrained(out)
    _tidy(out, name_or_path)


def build_once(target: Path, build: Callable[[Path], dict]) -> str:
    """``target`` if complete, else ``build(work_dir)`` (returns metadata) renamed into place.

    Built in a private folder next to the target, then renamed: an interrupted conversion
    leaves no half-written model behind, and concurrent builders cannot mix files.
    """
    if is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        start = time.time()
        meta = build(work)
        meta = {"format": FORMAT, **meta, "seconds": round(time.time() - start, 1)}
        (work / DONE).write_text(json.dumps(meta, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.is_symlink():
            target.unlink()  # a link to a stale folder (the test suite links the user's conversion)
        elif target.exists() and not is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # stale or broken earlier attempt
        try:
            work.rename(target)
        except OSError:
            if not is_complete(target):  # lost a race only if the winner's folder is complete
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return str(target)


def gguf_model_path(gguf: str | Path, cache_dir: str | Path | None = None) -> str:
    """A Hugging Face folder of the model in the GGUF file ``gguf``, converted on first use.

    Cached as ``<cache>/gguf/<file stem>-<file size>``; later calls return it at once.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    target = root / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}"
    if is_complete(target):
        return str(target)
    require_gguf(gguf.name)

    def build(work: Path) -> dict:
        dequantize_gguf(gguf, work, f"{gguf.name} (dequantized to bf16 by sparse_unsloth)")
        return {"source": str(gguf), "gguf_bytes": gguf.stat().st_size, "dtype": "bfloat16"}

    return build_once(target, build)
