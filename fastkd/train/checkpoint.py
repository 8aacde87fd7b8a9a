"""Trainer checkpoints: atomic, checksummed, every tensor in safetensors, exact resume.

A checkpoint of step ``N`` is a directory ``output_dir/checkpoint-{N:08d}/`` holding::

    {part}.safetensors   every tensor of one top-level part of the state ("model", "optimizer",
                         ...), keyed by its path in that part's nest ("state/0/exp_avg")
    state.json           the skeleton of all parts: every non-tensor value, with placeholders
                         naming the tensors; dicts keep int vs str keys, tuples stay tuples
    checkpoint.json      written last: format version, step, sha256 and byte size of each file

Guarantees:

- Atomic: a checkpoint is built in the sibling ``.checkpoint-{N:08d}.tmp`` (files and directory
  fsync'ed), then renamed into place and the parent directory fsync'ed. A process killed at any
  moment leaves complete ``checkpoint-*`` directories and hidden leftovers only (``.tmp``; while a
  same-step checkpoint is replaced, the previous one parked as ``.checkpoint-{N:08d}.old``, which
  the next :func:`save_checkpoint` restores if the new one never arrived). Deleted checkpoints are
  first renamed to ``.tmp``, so a half-deleted one is never listed.
- Exact: :func:`load_checkpoint` returns the saved nest with the same key types, tuples, lists,
  scalars and bit-identical tensors (dtype and shape included: 0-dim, bool, uint8, bf16, ...).
  Tensors are saved detached, on CPU, contiguous; tensors sharing storage (tied weights) are
  stored as separate copies. Dict subclasses (``OrderedDict``) come back as plain dicts.
- Checked: with ``verify=True`` a missing, truncated or altered file raises
  :class:`CheckpointError`. Whatever ``verify``, ``checkpoint.json`` must list every file that is
  read (``state.json`` and each part), by a plain name inside the directory (no ``..``, absolute
  path or symlink out): a checkpoint without its file list, or with a part missing from it, is
  refused rather than loaded unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._paths import contained_file

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HINT = "delete this checkpoint directory, or resume from an earlier checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is corrupted, incomplete or unreadable (the message names the file)."""


# ----------------------------------------------------------------------------- skeleton encoding
def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """JSON skeleton of ``obj``; its tensors go into ``tensors`` under path keys."""
    if isinstance(obj, torch.Tensor):
        key = "/".join(path[1:]) or "_"  # path[0] is the part name
        while key in tensors:  # a key containing "/" may collide with a nested path
            key += "#"
        t = obj.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or (ptr and ptr in seen):  # tied / shared storage: copy
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {"T": key, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint state: key {k!r} at '{'/'.join(path)}' is a "
                                f"{type(k).__name__}; only str and int dict keys are supported")
            items.append([k, _encode(v, path + [str(k)], tensors, seen)])
        return {"d": items}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, path + [str(i)], tensors, seen) for i, v in enumerate(obj)]
        return {"t" if isinstance(obj, tuple) else "l": items}
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    raise TypeError(f"checkpoint state: value at '{'/'.join(path)}' is a {type(obj).__name__}; "
                    "supported: dict, list, tuple, torch.Tensor, int, float, bool, str, None")


def _decode(node: Any, tensors: dict[str, torch.Tensor], file: Path, where: str = "",
            used: set | None = None) -> Any:
    """Inverse of :func:`_encode`; a skeleton that :func:`_encode` cannot have written (state.json
    from elsewhere) is a :class:`CheckpointError` naming ``state.json`` and the path in it. The
    keys of the tensors it places are added to ``used``."""
    def bad(detail: str) -> CheckpointError:
        return CheckpointError(f"{file.parent / 'state.json'}: malformed skeleton at '{where}': {detail}; {_HINT}")

    if node is None or type(node) in (bool, int, float, str):
        return node
    if not isinstance(node, dict) or len(node) == 0:
        raise bad(f"expected a value or a tagged object, got {type(node).__name__}")
    if "T" in node:
        key, dtype, shape = node.get("T"), node.get("dtype"), node.get("shape")
        if not isinstance(key, str) or not isinstance(dtype, str) or not isinstance(shape, list):
            raise bad("a tensor entry needs 'T' (str), 'dtype' (str) and 'shape' (list)")
        t = tensors.get(key)
        if used is not None:
            used.add(key)
        if t is None:
            raise CheckpointError(f"{file}: tensor '{key}' is missing; {_HINT}")
        if str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != shape:
            raise CheckpointError(f"{file}: tensor '{key}' is {t.dtype} {list(t.shape)}, "
                                  f"state.json says {dtype} {shape}; {_HINT}")
        return t
    if len(node) != 1 or next(iter(node)) not in ("d", "l", "t"):
        raise bad(f"unknown tags {sorted(map(str, node))[:4]} (expected T, d, l or t)")
    tag, items = next(iter(node.items()))
    if not isinstance(items, list):
        raise bad(f"'{tag}' must hold a list, got {type(items).__name__}")
    if tag == "d":
        out = {}
        for pair in items:
            if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) not in (str, int):
                raise bad("a dict entry must be a [key (str or int), value] pair")
            out[pair[0]] = _decode(pair[1], tensors, file, f"{where}/{pair[0]}", used)
        return out
    values = [_decode(v, tensors, file, f"{where}/{i}", used) for i, v in enumerate(items)]
    return tuple(values) if tag == "t" else values


# ----------------------------------------------------------------------------- file helpers
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash(path: Path, sync: bool = False) -> dict:
    """sha256 and size of ``path`` (fsync'ed first when ``sync``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory: rename it to a hidden ``.tmp`` first, so an interrupted
    deletion never leaves a partial directory under a listed name."""
    trash = path.parent / f".{path.name}.tmp"
    if not path.name.startswith("."):
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        _fsync_dir(path.parent)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def _recover(output_dir: Path) -> None:
    """Put back a ``.old`` checkpoint whose replacement never arrived; drop the other ``.old``."""
    for old in output_dir.glob(".checkpoint-*.old"):
        final = output_dir / old.name[1:-4]
        if not final.exists() and (old / "checkpoint.json").is_file():
            os.replace(old, final)
            _fsync_dir(output_dir)
        else:
            delete_checkpoint(old)


# ----------------------------------------------------------------------------- public API
def checkpoint_step(path) -> int:
    """Step of a checkpoint directory named ``checkpoint-{step:08d}``.

    Raises:
        ValueError: the name does not have that form.
    """
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint directory name (expected checkpoint-NNNNNNNN)")
    return int(match.group(1))


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints (with ``checkpoint.json``) in ``output_dir``, by ascending step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir()
             if _NAME.match(p.name) and (p / "checkpoint.json").is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir) -> Path | None:
    """The complete checkpoint with the highest step, or ``None`` if there is none."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir, step: int, state: dict, *, keep: int | None = None) -> Path:
    """Atomically write ``state`` as ``output_dir/checkpoint-{step:08d}``.

    Args:
        output_dir: directory holding the checkpoints (created if missing).
        step: training step (>= 0); an existing checkpoint of this step is replaced safely.
        state: top-level parts (``{"model": ..., "optimizer": ..., "rng": rng_state(), ...}``),
            each a nest of dict (str/int keys), list, tuple, Tensor, int, float, bool, str, None.
        keep: after saving, delete the oldest other checkpoints so at most ``keep`` remain
            (``None`` keeps all). Stale ``.checkpoint-*.tmp`` directories are removed too.

    Returns:
        The path of the new checkpoint directory.

    Raises:
        TypeError: ``state`` holds an unsupported value or key type.
        ValueError: bad ``step``, ``keep`` or part name.
    """
    if type(step) is not int or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ValueError(f"save_checkpoint: keep must be None or an int >= 1, got {keep!r}")
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict of parts, "
                        f"got {type(state).__name__}")
    for part in state:
        if not isinstance(part, str) or not _PART.match(part):
            raise ValueError(f"save_checkpoint: part name {part!r} must be a non-empty str of "
                             "letters, digits, '_', '.', '-' (it names a file)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _recover(output_dir)
    name = f"checkpoint-{step:08d}"
    final, tmp, old = output_dir / name, output_dir / f".{name}.tmp", output_dir / f".{name}.old"
    skeleton, tensors = {}, {part: {} for part in state}
    for part, value in state.items():  # encode everything first: a TypeError writes nothing
        skeleton[part] = _encode(value, [part], tensors[part], set())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for part in state:
        save_file(tensors.pop(part), str(tmp / f"{part}.safetensors"))
        files[f"{part}.safetensors"] = _hash(tmp / f"{part}.safetensors", sync=True)
    _write_json(tmp / "state.json", {"format_version": FORMAT_VERSION, "step": step,
                                     "parts": skeleton})
    files["state.json"] = _hash(tmp / "state.json")
    _write_json(tmp / "checkpoint.json", {"format_version": FORMAT_VERSION, "step": step,
                                          "files": files})
    _fsync_dir(tmp)

    if final.exists():  # same step saved again: park the old one, move the new one in, drop old
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_dir(output_dir)

    for stale in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep is not None:
        others = [p for p in list_checkpoints(output_dir) if p.name != name]
        for path in others[:max(0, len(others) + 1 - keep)]:
            delete_checkpoint(path)
    return final


def load_checkpoint(path, *, verify: bool = True, map_location="cpu") -> dict:
    """Load the ``state`` dict saved in checkpoint directory ``path``.

    Args:
        path: a ``checkpoint-NNNNNNNN`` directory.
        verify: check every file's byte size and sha256 against ``checkpoint.json``.
        map_location: device the tensors are loaded onto.

    Returns:
        The saved state: same nesting, key types, tuples/lists and bit-identical tensors.

    Raises:
        CheckpointError: the checkpoint is incomplete, corrupted, of an unknown format version,
            or unreadable.
    """
    path = Path(path)
    manifest_file = path / "checkpoint.json"
    if not manifest_file.is_file():
        raise CheckpointError(f"incomplete checkpoint {path} (no checkpoint.json: the save was "
                              f"interrupted); {_HINT}")
    manifest = _read_json(manifest_file)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_file}: must be a JSON object, got a JSON "
                              f"{type(manifest).__name__}; {_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_file}: unknown checkpoint format version "
                              f"{manifest.get('format_version')!r} (this fastkd reads version "
                              f"{FORMAT_VERSION}); load it with the fastkd version that wrote it")
    files = _file_list(path, manifest_file, manifest)
    for fname, expected in files.items() if verify else ():
        file = path / fname
        if not file.is_file():
            raise CheckpointError(f"{file}: file listed in checkpoint.json is missing; {_HINT}")
        actual = _hash(file)
        if actual != expected:
            raise CheckpointError(
                f"{file}: checksum mismatch (expected sha256 {expected['sha256'][:12]}…, "
                f"{expected['bytes']} bytes; found {actual['sha256'][:12]}…, {actual['bytes']} "
                f"bytes): the file is corrupted; {_HINT}")
    state_file = path / "state.json"
    skeleton_doc = _read_json(state_file)
    parts = skeleton_doc.get("parts") if isinstance(skeleton_doc, dict) else None
    if not isinstance(parts, dict):
        raise CheckpointError(f"{state_file}: no 'parts' skeleton; {_HINT}")
    state = {}
    for part, skeleton in parts.items():
        fname = f"{part}.safetensors"
        if not isinstance(part, str) or not _PART.match(part) or fname not in files:
            raise CheckpointError(
                f"{state_file}: part {part!r} has no file {fname!r} listed in checkpoint.json 'files' "
                f"(a checkpoint never loads a file it cannot verify); {_HINT}")
        file = contained_file(path, fname, where=f"{state_file} part {part!r}", error=CheckpointError)
        try:
            tensors = load_file(str(file), device=str(map_location))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{file}: unreadable ({exc}); {_HINT}") from exc
        used: set = set()
        state[part] = _decode(skeleton, tensors, file, part, used)
        unused = sorted(set(tensors) - used)
        if unused:
            raise CheckpointError(f"{state_file}: part {part!r} does not place tensor(s) {unused[:3]} of "
                                  f"{file.name}: the skeleton does not match its tensors; {_HINT}")
    return state


def _file_list(path: Path, manifest_file: Path, manifest: dict) -> dict:
    """``checkpoint.json``'s ``files``, checked: an object of plain file names inside ``path``
    (no ``..``, absolute path or symlink out), each ``{"sha256": 64 hex, "bytes": int}``, with
    ``state.json`` among them."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest_file}: field 'files' (the file list with checksums) is missing "
                              f"or empty, got {files!r}; the checkpoint cannot be verified; {_HINT}")
    for fname, expected in files.items():
        contained_file(path, fname, where=f"{manifest_file} field 'files'", error=CheckpointError)
        if (not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str)
                or type(expected.get("bytes")) is not int):
            raise CheckpointError(f"{manifest_file}: field 'files'[{fname!r}] must be "
                                  f"{{\"sha256\": hex, \"bytes\": int}}, got {expected!r}; {_HINT}")
    if "state.json" not in files:
        raise CheckpointError(f"{manifest_file}: field 'files' does not list state.json; the checkpoint "
                              f"cannot be verified; {_HINT}")
    return files


def _read_json(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc}); {_HINT}") from exc


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Global RNG states: Python ``random``, NumPy's global generator, torch CPU, and every CUDA
    device when CUDA is available (CUDA is not initialised otherwise). Storable by
    :func:`save_checkpoint`."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNG states captured by :func:`rng_state`."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("set_rng_state: the state has CUDA RNG states but CUDA is not "
                          "available; they are not restored", stacklevel=2)
            return
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"set_rng_state: {len(cuda)} saved CUDA RNG states for "
                          f"{torch.cuda.device_count()} devices; restoring the common ones",
                          stacklevel=2)
        for index, device_state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
