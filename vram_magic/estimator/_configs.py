"""Which config a model is, and which dtype its load gets.

A model is found as a local folder (or its ``config.json``), then in the Hugging Face cache, then among the
configs bundled in ``vram_magic/configs``, then on the Hub (never when ``HF_HUB_OFFLINE`` is set). The dtype
is the one asked, else the config's, else the checkpoint's (its safetensors header), else float32 (always
float32 before transformers 5). Where the config came from and why this dtype are "source" and "dtype" notes.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vram_magic._hf import DTYPES
from vram_magic._types import Note, facts
from vram_magic.estimator._counting import transformers_major
from vram_magic.estimator._disk import key_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vram_magic.estimator._counting import Described

    ConfigLike = PretrainedConfig | Described  # what pick_dtype and prequantized read: dtype, quantization

CONFIGS_DIR = Path(__file__).parent.parent / "configs"
MiB = 2**20
Progress = Callable[[str], None]  # told, in a line, before a step that can take seconds

DTYPE_NAMES = frozenset(DTYPES)  # the dtype spellings estimate() takes (torch.<name> too)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# The quantization methods whose transformers 4 quantizer loads float16 when from_pretrained gets no dtype.
_FLOAT16_BEFORE_5 = frozenset({"bitsandbytes", "gptq", "awq", "aqlm", "eetq", "compressed-tensors"})
_HUB_TIMEOUT_S = 5
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Located:
    """A model's config as found: its values as saved, where they came from, and the transformers config
    built from them on first use (a cached estimate never builds it: see ``_counting.described``)."""

    name: str
    source: Note  # "source": where the config came from
    folder: Path | None  # where the weights may be (for their dtype)
    values: dict[str, Any]  # config.json as saved (or the given config's to_dict())
    build: Callable[[], PretrainedConfig]
    _config: PretrainedConfig | None = None
    progress: Progress | None = None
    _told: bool = False
    _key: str | None = None

    @property
    def key(self) -> str:
        """The name of what is counted of this config in the caches (see ``_disk.key_of``)."""
        if self._key is None:
            self._key = key_of(self.values)
        return self._key

    @property
    def built(self) -> bool:
        return self._config is not None

    def config(self) -> PretrainedConfig:
        if self._config is None:
            self._config = self.build()
        return self._config

    def counting(self) -> None:
        """Say, once, that this model is being counted: the first time takes seconds (transformers imports
        the model's code), later estimates of it come from the cache."""
        if self.progress is not None and not self._told:
            self._told = True
            self.progress(f"Counting {self.name} (the first time takes a few seconds)…")


def load_config(model: str | PretrainedConfig) -> PretrainedConfig:
    """The transformers config of ``model``: a local folder (or its ``config.json``), the Hugging Face cache,
    the bundled configs of popular models, then the Hub (never when ``HF_HUB_OFFLINE`` is set)."""
    return resolve(model).config()


def bundled_models() -> tuple[str, ...]:
    """The Hub ids whose config ships with vram_magic (they work offline, with no download)."""
    return tuple(sorted(path.stem.replace("--", "/") for path in CONFIGS_DIR.glob("*--*.json")))


def resolve(model: str | PretrainedConfig, progress: Progress | None = None) -> Located:
    """Find the config of ``model``; ``progress`` is told before a download from the Hub."""
    if not isinstance(model, (str, os.PathLike)):
        from transformers import PretrainedConfig

        if isinstance(model, PretrainedConfig):
            name = str(getattr(model, "name_or_path", "") or model.model_type or type(model).__name__)
            folder = _existing_path(name) if name else None
            values = {"__class__": type(model).__name__, **model.to_dict()}
            source = Note("source", facts(origin="object"))
            return Located(name, source, folder, values, lambda: model, model, progress)
        raise ValueError(
            f"model must be a Hub id, a folder with a config.json or a transformers config, not "
            f"{type(model).__name__}."
        )
    text = os.fspath(model).strip()
    if not text:
        raise ValueError("model is empty: pass a Hub id such as 'Qwen/Qwen2.5-7B' or a local folder.")
    path = _existing_path(text)
    if path is not None:
        source = Note("source", facts(origin="path", path=str(path)))
        try:
            values, build = _from_path(path)
        except OSError as error:  # a folder this user may not read
            raise ValueError(f"Cannot read {path}: {error.strerror or error}.") from None
        return Located(text, source, path if path.is_dir() else path.parent, values, build, progress=progress)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        raise ValueError(f"No such folder: {text}. Pass a folder with a config.json, or a Hub id.")
    if not _REPO_ID.match(text):
        raise ValueError(f"{text!r} is neither a folder nor a Hub model id (like 'meta-llama/Llama-3.1-8B').")
    cached = _from_hub_cache(text)
    if cached is not None:
        values, build = _from_path(cached)
        source = Note("source", facts(origin="cache"))
        return Located(text, source, cached.parent, values, build, progress=progress)
    bundled = _bundled(text)
    if bundled is not None:
        repo_id, same_as = bundled
        source = Note(
            "source", facts(origin="bundled", repo_id=repo_id, stands_for=text if same_as else None)
        )
        values, build = _from_json(CONFIGS_DIR / (repo_id.replace("/", "--") + ".json"))
        return Located(text, source, None, values, build, progress=progress)
    if progress is not None:
        progress(f"Fetching the config of {text} from the Hugging Face Hub…")
    values, build = _from_path(_download(text))
    return Located(text, Note("source", facts(origin="hub")), None, values, build, progress=progress)


def _existing_path(text: str) -> Path | None:
    """``text`` as a path that exists here, else None (also for a name no path can have: too long, an
    unknown user's ``~``, one below a folder this user may not list)."""
    try:
        path = Path(text).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError):
        return None


def _from_path(path: Path) -> tuple[dict[str, Any], Callable[[], PretrainedConfig]]:
    """The values of the config.json at ``path`` (a file, or a folder holding one), and how to build its
    transformers config. Raises OSError when it cannot be read."""
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path} is not a config.json: pass the folder a model was saved to.")
        return _from_json(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} has no config.json: pass the folder a model was saved to (save_pretrained), or a Hub id."
        )
    values = _json_values(path / "config.json")

    def build() -> PretrainedConfig:
        from transformers import AutoConfig

        try:
            config: PretrainedConfig = AutoConfig.from_pretrained(path)
        except Exception as error:  # custom code (trust_remote_code), unknown model_type, bad JSON
            raise ValueError(f"transformers cannot read {path / 'config.json'}: {error}") from error
        return config

    return values, build


def _from_json(path: Path) -> tuple[dict[str, Any], Callable[[], PretrainedConfig]]:
    values = _json_values(path)

    def build() -> PretrainedConfig:
        from transformers import AutoConfig

        try:
            config: PretrainedConfig = AutoConfig.for_model(**copy.deepcopy(values))  # it edits rope_scaling
        except Exception as error:
            raise ValueError(f"transformers cannot read {path}: {error}") from error
        return config

    return values, build


def _json_values(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"transformers cannot read {path}: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"transformers cannot read {path}: it holds no JSON object.")
    return values


def _from_hub_cache(repo_id: str) -> Path | None:
    """The cached ``config.json`` of ``repo_id`` (main revision) when there is one; never goes online."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id huggingface_hub rejects: let the other sources answer
        return None
    return Path(found) if isinstance(found, str) else None


def _bundled(name: str) -> tuple[str, bool] | None:
    """(the bundled repo id, whether it stands in for another name) for a Hub id or its short name."""
    known = {repo_id.lower(): repo_id for repo_id in bundled_models()}
    wanted = name.lower()
    if wanted in known:
        return known[wanted], False
    try:
        aliases = json.loads((CONFIGS_DIR / "aliases.json").read_text())
    except OSError:  # an install without the data files: no bundled configs at all
        return None
    aliases = {key.lower(): value for key, value in aliases.items()}
    if wanted in aliases:
        return aliases[wanted], True
    if "/" not in wanted:  # "bert-base-uncased", "gpt2", "Llama-3.2-1B": the short name, when it is unique
        short = [repo_id for key, repo_id in known.items() if key.split("/", 1)[1] == wanted]
        if len(short) == 1:
            return short[0], False
    return None


def _offline() -> bool:
    """huggingface_hub's offline mode, from its constants or (when set after import) the environment."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((value or "").upper() in {"1", "ON", "YES", "TRUE"} for value in values)


def _download(repo_id: str) -> Path:
    hint = "Pass a local path, or run once online so the config is cached."
    if _offline():
        raise ValueError(
            f"No config for {repo_id!r}: it is not in the Hugging Face cache nor among vram_magic's bundled "
            f"configs, and HF_HUB_OFFLINE is set. {hint}"
        )
    from huggingface_hub import get_session, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:  # one quick try first (any answer will do): hf_hub_download retries a dead network for ~25 s
        get_session().head(hf_hub_url(repo_id, "config.json"), timeout=_HUB_TIMEOUT_S)
    except Exception as error:
        raise ValueError(
            f"Could not reach the Hugging Face Hub for {repo_id}'s config ({type(error).__name__}: {error}). "
            f"{hint}"
        ) from error
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except GatedRepoError as error:
        raise ValueError(
            f"{repo_id} is gated on the Hub: accept its licence there and log in (hf auth login). {hint}"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"No model {repo_id!r} on the Hub (or it is private: log in with hf auth login). {hint}"
        ) from error
    except Exception as error:  # no network, a proxy, a timeout, no config.json in the repo
        raise ValueError(
            f"Could not fetch the config of {repo_id} from the Hub ({type(error).__name__}: {error}). {hint}"
        ) from error


def pick_dtype(
    asked: str | None, config: ConfigLike, folder: Path | None = None, quantization: str | None = None
) -> tuple[str, Note]:
    """(dtype name, a "dtype" note saying where it came from): what ``from_pretrained`` loads when not told.
    From transformers 5 on that is the config's dtype, else the checkpoint's own (read from its safetensors
    header when the weights are here), else float32 (the checkpoints of models that name no dtype were saved
    before 16-bit was usual); before transformers 5 it is float32, and float16 for a quantized load
    (``quantization`` asked, or a checkpoint saved by bitsandbytes, GPTQ, AWQ...), which transformers 4's
    quantizers impose."""
    if asked is not None:
        return asked, Note("dtype", facts(dtype=asked, origin="asked"))
    if transformers_major() < 5:
        saved = prequantized(config)
        if quantization is not None or (saved is not None and saved[0] in _FLOAT16_BEFORE_5):
            return "float16", Note("dtype", facts(dtype="float16", origin="transformers-4-quantized"))
        return "float32", Note("dtype", facts(dtype="float32", origin="transformers-4"))
    found = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    name = str(found).removeprefix("torch.") if found is not None else None
    if name in DTYPE_BYTES:
        return name, Note("dtype", facts(dtype=name, origin="config"))
    weights = _weights_dtype(folder) if folder is not None else None
    if weights is not None:
        return weights, Note("dtype", facts(dtype=weights, origin="weights"))
    return "float32", Note("dtype", facts(dtype="float32", origin="assumed"))


def _weights_dtype(folder: Path) -> str | None:
    """The floating dtype of a checkpoint's first tensor, from its safetensors header (a few KiB read)."""
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            first = next(iter(json.loads(index.read_text())["weight_map"].values()))
            path = folder / first
        else:
            path = folder / "model.safetensors"
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100 * MiB:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError, KeyError, StopIteration):
        return None
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def prequantized(config: ConfigLike) -> tuple[str, str] | None:
    """(method, "4bit"/"8bit") for a checkpoint saved already quantized (a ``quantization_config`` in its
    config.json: bitsandbytes, GPTQ, AWQ...), else None."""
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    values = found if isinstance(found, dict) else getattr(found, "__dict__", {})
    method = str(getattr(values.get("quant_method"), "value", values.get("quant_method")) or "unknown")
    if method == "bitsandbytes":
        if values.get("load_in_4bit"):
            return method, "4bit"
        if values.get("load_in_8bit"):
            return method, "8bit"
        return None
    bits = values.get("bits") or values.get("w_bit") or (8 if "8" in method else 4)
    return method, "8bit" if int(bits) >= 8 else "4bit"
