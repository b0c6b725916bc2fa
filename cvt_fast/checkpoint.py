"""Loading and saving CvT weights: official model-zoo files, Hugging Face files, cvt_fast checkpoints.

`load_checkpoint` accepts
- official model-zoo files: a bare state dict, or one wrapped under 'state_dict' or
  'model' (the official trainer writes {'model': <name>, 'state_dict': ...}), with or
  without the 'module.' prefix of DistributedDataParallel (and '_orig_mod.' of
  torch.compile);
- Hugging Face `CvtForImageClassification` (or `CvtModel`) weights, .bin/.pth through
  torch.load or .safetensors, recognised by their 'cvt.encoder.stages.' keys and renamed
  by `cvt_fast.hf_convert`; a directory holding model.safetensors or pytorch_model.bin;
- cvt_fast training checkpoints: a dict with 'model' (plus optimizer state, 'ema', ...);
  the 'model' weights are loaded.

Every failure is a `CheckpointError` that names the file and says what is wrong:
unreadable or truncated file, no state dict inside, or keys that do not fit the model
(missing, unexpected, wrongly shaped, with the architecture the file looks like).

Files are written with `atomic_save`: a temporary file in the same folder, flushed
and fsynced, then renamed over the target, so a crash leaves the old file intact. A
write that fails (a full disk, a file size limit) raises the OSError that caused it,
not torch's "unexpected pos".

Training checkpoints carry a sha256 digest of their contents (`add_checksum`); loading
one recomputes it, so a file damaged inside a still valid zip (flipped bytes in a
tensor) is refused with a CheckpointError instead of loading corrupt weights. Files
without a digest (official ones, older cvt_fast ones) load unverified.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

import torch
from torch import nn

from cvt_fast import hf_convert

PathOrStateDict = Union[str, "os.PathLike[str]", Mapping[str, Any]]

# How many keys of each kind an error message lists before it only gives the count.
_SHOWN = 10
# Wrapper entries that may hold the weights, in the order they are tried. 'model' comes
# first (cvt_fast training checkpoints); in official trainer checkpoints 'model' is the
# model's name (a string) and the weights sit under 'state_dict'.
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module", "net")
# Prefixes that wrappers add to every key: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Files tried, in order, when a directory (a Hugging Face model folder) is given.
_DIRECTORY_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth")


# The entry of a training checkpoint that holds the digest of everything else in it.
CHECKSUM_KEY = "checksum"
_CHECKSUM_ALGORITHM = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or its weights do not fit the model."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did."""

    source: str  # the file, or "<state dict>"
    format: str  # "official" or "huggingface" (the key names found)
    wrapper: str | None  # entry the weights came from ('state_dict', 'model', ...) or None
    loaded: list[str] = field(default_factory=list)  # model keys set from the file
    missing: list[str] = field(default_factory=list)  # model keys the file lacks (strict=False)
    unexpected: list[str] = field(default_factory=list)  # file keys the model lacks (strict=False)
    skipped: list[str] = field(default_factory=list)  # file keys deliberately not loaded (head)
    head_reset: bool = False  # the classifier was re-initialised (reset_head=True)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format} keys"
                 + (f", under {self.wrapper!r})" if self.wrapper else ")")]
        if self.head_reset:
            parts.append(f"head re-initialised (skipped {len(self.skipped)} head tensors of the file)")
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {_list_keys(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {_list_keys(self.unexpected)}")
        return "; ".join(parts)


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


# ----------------------------------------------------------------------------- reading


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # A safetensors file starts with the little-endian u64 length of a JSON header.
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _resolve_path(path: Path) -> Path:
    if path.is_dir():
        for name in _DIRECTORY_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"checkpoint directory '{path}' holds none of {list(_DIRECTORY_FILES)}")
    if not path.exists():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path '{path}' is not a regular file")
    return path


def read_checkpoint_file(path: str | os.PathLike[str], weights_only: bool = True) -> Any:
    """The object stored in a checkpoint file (.pth/.pt/.bin via torch.load, or .safetensors), on the CPU.

    Raises CheckpointError naming the file when it is missing, empty, truncated or not a
    checkpoint at all.
    """
    file = _resolve_path(Path(path))
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file '{file}': {exc}") from exc
    if size == 0:
        raise CheckpointError(f"checkpoint file '{file}' is empty (0 bytes)")

    if file.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"checkpoint file '{file}' ({size} bytes) is not a valid safetensors file "
                f"(truncated or corrupt?): {type(exc).__name__}: {_first_line(exc)}") from exc

    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc) if weights_only and head[:2] in (b"PK", b"\x80\x02") else None
        if refused:
            raise CheckpointError(
                f"checkpoint file '{file}' holds Python objects that safe loading (weights_only=True) "
                f"refuses ({refused}); if you trust the file, pass weights_only=False") from exc
        # Anything else the safe unpickler trips over (an unknown opcode, a truncated stream)
        # is damage: torch's advice to retry with weights_only=False does not apply to it.
        raise CheckpointError(_unreadable(file, size, head, _weights_only_detail(exc))) from exc
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, ValueError, ... on bad files
        raise CheckpointError(_unreadable(file, size, head, exc)) from exc


def _weights_only_detail(exc: BaseException) -> BaseException:
    """The line of torch's weights-only error that says what went wrong (its message is a page
    of advice around one 'WeightsUnpickler error:' line)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("error:", 1)[1].strip() or next((x for x in lines[i + 1:] if x), "")
            return pickle.UnpicklingError(detail or "unreadable pickle data")
    return exc


def _refused_global(exc: BaseException) -> str | None:
    """The Python object a weights-only load refused ('GLOBAL x.y was not an allowed global'),
    or None when the error is not such a refusal."""
    match = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
    if match:
        return match.group(1)
    match = re.search(r"Unsupported global: ([^\n]+?)(?: was not| \(|$)", str(exc), re.MULTILINE)
    return match.group(1).strip() if match else None


def _first_line(exc: BaseException, limit: int = 240) -> str:
    # Library messages can run to paragraphs; their first sentence says what broke.
    text = str(exc).strip()
    line = text.splitlines()[0].split(". ")[0] if text else "(no message)"
    return line if len(line) <= limit else line[:limit] + "..."


def _unreadable(file: Path, size: int, head: bytes, exc: BaseException) -> str:
    if head[:2] == b"PK":
        what = "a damaged PyTorch zip checkpoint (truncated or corrupt?)"
    elif head[:1] == b"\x80":
        what = "a damaged pickle checkpoint (truncated or corrupt?)"
    else:
        what = "not a PyTorch or safetensors checkpoint"
    return (f"checkpoint file '{file}' ({size} bytes) is {what}: "
            f"{type(exc).__name__}: {_first_line(exc)}")


# ------------------------------------------------------------------ finding the weights


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and any(isinstance(v, torch.Tensor) for v in obj.values())


def _extract_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The weights inside a loaded checkpoint object, and the wrapper entry they came from."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict "
                              "(expected a dict of tensors, or one under 'state_dict' or 'model')")
    wrapper = None
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                wrapper = key
                obj = obj[key]
                break
        else:
            if _is_state_dict(obj):
                # Tensors at the top, mixed with other things: name what is not a tensor.
                odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
                raise CheckpointError(
                    f"checkpoint {source}: entry {odd[0]!r} is a {type(obj[odd[0]]).__name__}, not a tensor "
                    f"({len(odd)} such entries); expected a state dict of tensors")
            top = ", ".join(repr(k) for k in list(obj)[:_SHOWN])
            raise CheckpointError(f"checkpoint {source} holds no state dict: its entries are {top}; "
                                  f"expected tensors, or a dict of tensors under one of {list(_WRAPPER_KEYS)}")
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            where = f" under {wrapper!r}" if wrapper else ""
            raise CheckpointError(f"checkpoint {source}: entry {key!r}{where} is a {type(value).__name__}, "
                                  "not a tensor; expected a state dict of tensors")
        state_dict[key] = value
    return _strip_prefixes(state_dict), wrapper


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Repeat: a compiled model inside DDP gives 'module._orig_mod.'.
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def _unwrap(model: nn.Module) -> nn.Module:
    """The CvT module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ------------------------------------------------------------------------ architecture


def describe_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Stage widths, depths and head size read off official keys (what can be seen without a config)."""
    dims: dict[int, int] = {}
    depth: dict[int, int] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if not parts[0].startswith("stage") or not parts[0][5:].isdigit():
            continue
        stage = int(parts[0][5:])
        if parts[1:3] == ["patch_embed", "proj"] and parts[-1] == "weight" and value.dim() == 4:
            dims[stage] = int(value.shape[0])
        if len(parts) > 2 and parts[1] == "blocks" and parts[2].isdigit():
            depth[stage] = max(depth.get(stage, 0), int(parts[2]) + 1)
    stages = sorted(set(dims) | set(depth))
    head = state_dict.get("head.weight")
    return {
        "DIM_EMBED": [dims.get(s) for s in stages],
        "DEPTH": [depth.get(s, 0) for s in stages],
        "num_classes": int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None,
    }


def guess_variant(arch: Mapping[str, Any]) -> str | None:
    """The paper variant ('cvt-13', 'cvt-21', 'cvt-w24') with these widths and depths, if any."""
    from cvt_fast.specs import MODEL_SPECS

    for name, spec in MODEL_SPECS.items():
        if list(spec["DIM_EMBED"]) == arch["DIM_EMBED"] and list(spec["DEPTH"]) == arch["DEPTH"]:
            return name
    return None


def _arch_words(arch: Mapping[str, Any]) -> str:
    name = guess_variant(arch)
    text = f"DIM_EMBED {arch['DIM_EMBED']}, DEPTH {arch['DEPTH']}"
    return f"{name} ({text})" if name else text


# --------------------------------------------------------------------------- loading


def _is_batch_counter(key: str) -> bool:
    # BatchNorm's num_batches_tracked does not change the forward; old files lack it.
    return key.endswith(".num_batches_tracked")


def _model_num_classes(model: nn.Module, model_sd: Mapping[str, torch.Tensor]) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model_sd.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: PathOrStateDict,
    strict: bool = True,
    reset_head: bool = False,
    weights_only: bool = True,
) -> LoadReport:
    """Load CvT weights into `model` from a file or an in-memory state dict; return a LoadReport.

    strict=True: every model tensor must come from the file and every file tensor must
    fit the model (BatchNorm's num_batches_tracked may be absent). strict=False allows
    missing and unexpected keys (they are listed in the report), never wrong shapes.
    reset_head=True (fine-tuning): when the file's classifier has another shape than the
    model's (or the file has none), the file's head.* is skipped and the model's head is
    re-initialised through `model.reset_classifier`. The image size never matters: CvT has
    no position embedding. weights_only=False unpickles arbitrary objects: trusted files only.
    Hugging Face's hub weights (microsoft/cvt-*) were converted from the official zoo (QuickGELU);
    build the model with act="gelu" only to reproduce the Hugging Face port's own logits.
    A file that carries a digest (cvt_fast training checkpoints) is verified against it first.
    Raises CheckpointError (a RuntimeError) naming the file and what is wrong.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}; expected a torch.nn.Module")
    if isinstance(path_or_state_dict, Mapping):
        source = "<state dict>"
        obj: Any = path_or_state_dict
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        source = f"'{os.fspath(path_or_state_dict)}'"
        obj = read_checkpoint_file(path_or_state_dict, weights_only=weights_only)
    else:
        raise TypeError(f"path_or_state_dict is a {type(path_or_state_dict).__name__}; "
                        "expected a file path or a state dict (Mapping)")

    if isinstance(obj, Mapping) and CHECKSUM_KEY in obj:
        verify_checksum(obj, source)
    state_dict, wrapper = _extract_state_dict(obj, source)
    fmt = "official"
    if hf_convert.is_hf_state_dict(state_dict):
        fmt = "huggingface"
        try:
            state_dict = hf_convert.hf_to_official(state_dict)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {source} has Hugging Face CvT keys, but {exc}") from exc

    target = _unwrap(model)
    model_sd = target.state_dict()
    report = LoadReport(source=source, format=fmt, wrapper=wrapper)

    # Fine-tuning on another label set: drop the file's head when it does not fit.
    head_keys = [k for k in state_dict if k.startswith("head.")]
    if reset_head:
        file_head = state_dict.get("head.weight")
        model_head = model_sd.get("head.weight")
        head_fits = (file_head is not None and model_head is not None
                     and tuple(file_head.shape) == tuple(model_head.shape))
        if not head_fits:
            report.skipped = head_keys
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
            report.head_reset = True

    missing = [k for k in model_sd if k not in state_dict and not _is_batch_counter(k)
               and not (report.head_reset and k.startswith("head."))]
    unexpected = [k for k in state_dict if k not in model_sd]
    mismatched = [k for k in state_dict if k in model_sd
                  and tuple(state_dict[k].shape) != tuple(model_sd[k].shape)]
    matched = [k for k in state_dict if k in model_sd and k not in mismatched]

    if mismatched or (strict and (missing or unexpected)) or not matched:
        raise CheckpointError(_mismatch_message(source, target, state_dict, model_sd, missing,
                                                unexpected, mismatched, strict, reset_head))

    reset = getattr(target, "reset_classifier", None)
    if report.head_reset and reset is None:
        raise CheckpointError(f"reset_head=True but {type(target).__name__} has no reset_classifier(); "
                              "expected a cvt_fast CvT model")
    to_load = {k: state_dict[k] for k in matched}
    # strict=False: our own key check above is the strict one (it tolerates a missing
    # num_batches_tracked); torch's strict mode would also reject that.
    with torch.no_grad():
        target.load_state_dict(to_load, strict=False)
    if report.head_reset:
        reset(_model_num_classes(target, model_sd))
    report.loaded = matched
    report.missing = missing
    report.unexpected = unexpected
    return report


def _mismatch_message(source: str, model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                      model_sd: Mapping[str, torch.Tensor], missing: list[str], unexpected: list[str],
                      mismatched: list[str], strict: bool, reset_head: bool) -> str:
    lines = [f"checkpoint {source} does not fit {type(model).__name__} (strict={strict}):"]
    file_arch = describe_architecture(state_dict)
    model_arch = describe_architecture(model_sd)
    if file_arch["DIM_EMBED"] != model_arch["DIM_EMBED"] or file_arch["DEPTH"] != model_arch["DEPTH"]:
        if any(file_arch["DIM_EMBED"]) or any(file_arch["DEPTH"]):
            lines.append(f"  the file looks like {_arch_words(file_arch)}; "
                         f"the model is {_arch_words(model_arch)}")
        else:
            lines.append("  the file has no CvT stage keys (stage{i}.*): it is not a CvT checkpoint")
    if missing:
        lines.append(f"  {len(missing)} missing key(s) (in the model, not in the file): {_list_keys(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s) (in the file, not in the model): "
                     f"{_list_keys(unexpected)}")
    if mismatched:
        shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(model_sd[k].shape)}"
                  for k in mismatched[:_SHOWN]]
        more = f", ... ({len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else ""
        lines.append(f"  {len(mismatched)} key(s) with another shape: " + ", ".join(shapes) + more)
    if not (missing or unexpected or mismatched):
        lines.append("  no tensor of the file matches a tensor of the model")
    if not reset_head and mismatched and all(k.startswith("head.") for k in mismatched):
        lines.append("  only the classifier differs: pass reset_head=True to fine-tune on another label set")
    return "\n".join(lines)


# ------------------------------------------------------------------------- checksums


def tensor_digest(obj: Any) -> str:
    """sha256 (hex) of a checkpoint object: every tensor's dtype, shape and bytes, and every
    other value's repr, each under its path in the nesting, mapping keys in sorted order.

    Two objects with equal digests hold the same tensors at the same places, bit for bit;
    a tensor saved and loaded back gives the digest it had (its storage layout and device
    do not enter, only its values).
    """
    digest = hashlib.sha256()
    _feed(digest, obj, "")
    return digest.hexdigest()


def _feed(digest: Any, obj: Any, path: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest.update(f"{path}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=repr):
            _feed(digest, obj[key], f"{path}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{path}:{type(obj).__name__}[{len(obj)}]\n".encode())
        for i, value in enumerate(obj):
            _feed(digest, value, f"{path}[{i}]")
    else:
        digest.update(f"{path}={obj!r}\n".encode())


def add_checksum(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `state` (a dict with string keys) with its digest under CHECKSUM_KEY."""
    body = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    return {**body, CHECKSUM_KEY: {"algorithm": _CHECKSUM_ALGORITHM, "digest": tensor_digest(body)}}


def verify_checksum(state: Mapping[str, Any], source: str) -> bool:
    """True when `state` carries a digest and it matches; False when it carries none (an older
    or foreign file). Raises CheckpointError naming `source` when the contents do not match."""
    stored = state.get(CHECKSUM_KEY)
    if stored is None:
        return False
    if not isinstance(stored, Mapping) or stored.get("algorithm") != _CHECKSUM_ALGORITHM:
        raise CheckpointError(f"checkpoint {source} has a '{CHECKSUM_KEY}' entry this version cannot check "
                              f"({stored!r:.80}); expected a {_CHECKSUM_ALGORITHM} digest")
    actual = tensor_digest({k: v for k, v in state.items() if k != CHECKSUM_KEY})
    if actual != stored.get("digest"):
        raise CheckpointError(f"checkpoint {source} is corrupt: its contents do not match the {_CHECKSUM_ALGORITHM} "
                              "digest stored in it (damaged on disk or in transfer)")
    return True


# ---------------------------------------------------------------------------- saving


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Not every platform can open a directory (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# `.<target name>.<pid>.<8 hex digits>.tmp`: what a write killed before its rename leaves.
TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.\d+\.[0-9a-f]{8}\.tmp$")


def temporary_path(target: Path) -> Path:
    """A fresh temporary name beside `target` (matches TEMPORARY_NAME)."""
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


class _WriteRecorder:
    """Passes writes through to a file and remembers the OSError of one that failed.

    torch.save turns a failed write (no space left, a file size limit) into
    RuntimeError('... unexpected pos ...'); the recorded error says what really happened.
    """

    def __init__(self, file: BinaryIO):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def _atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    target = Path(path)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    # os.open with mode 0o666 honours the umask, so the file ends up with the usual permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                write(recorder)  # type: ignore[arg-type]
            except RuntimeError as err:
                if recorder.error is not None:
                    raise recorder.error from err
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        # Leave the previous file as it was and no partial temporary behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return target


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save(obj) to `path` atomically: temp file in the same folder, fsync, os.replace, fsync folder.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write `data` to `path` atomically (as atomic_save does)."""
    return _atomic_write(path, lambda f: f.write(data))


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official keys, on the CPU, without DDP/compile prefixes."""
    state_dict = _unwrap(model).state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in _strip_prefixes(dict(state_dict)).items()}


def save_official_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save the weights as an official model-zoo file (bare state dict), atomically.

    A path ending in .safetensors is written in that format; anything else with torch.save.
    The official code and `load_checkpoint` both read the result.
    """
    state_dict = official_state_dict(model)
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save as safetensors_bytes

        return _atomic_write(path, lambda f: f.write(safetensors_bytes(state_dict)))
    return atomic_save(state_dict, path)


__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "LoadReport",
    "add_checksum",
    "atomic_save",
    "atomic_write_bytes",
    "describe_architecture",
    "guess_variant",
    "load_checkpoint",
    "official_state_dict",
    "read_checkpoint_file",
    "save_official_state_dict",
    "tensor_digest",
    "verify_checksum",
]
