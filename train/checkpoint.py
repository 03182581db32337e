"""Checkpoints as safetensors: tensors + JSON metadata, never pickles.

A checkpoint `run/best.safetensors` holds the tensors and, in the safetensors header, the JSON meta
(also written next to it as `run/best.json` for people and tools). The header is the truth: a crash
between the two writes can leave the sidecar one save behind, so loading rewrites a sidecar that
differs from the header. Loading never unpickles, so a
checkpoint from elsewhere cannot run code. Nested training state (optimizer, LR scheduler, RNG) is
stored with `flatten_state`/`unflatten_state`: its tensors go to the file, its structure to the meta.

    python -m train.checkpoint inspect runs/t1/best.safetensors
    python -m train.checkpoint convert old.pt new.safetensors   # restricted unpickler (weights_only)
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from deploy.errors import UserError, cli
from deploy.fileio import atomic_write_bytes, atomic_write_text
from train.layout import meta_sidecar

META_KEY = "fundus_mtkd.meta"
_TAGS = ("__tensor__", "__dict__", "__items__", "__tuple__")


class CheckpointError(UserError):
    """A checkpoint file that cannot be read or does not fit; the message says how to fix it."""


# --- nested state <-> flat tensors + JSON structure ------------------------------------------------
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split nested state (dicts, lists, tuples, scalars, tensors) into named tensors and a JSON-able
    structure in which each tensor is replaced by {"__tensor__": name}. Exact round trip with
    `unflatten_state`, including int dict keys and tuples (optimizer state dicts)."""
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, Tensor):
            name = f"{prefix}{path}" or f"{prefix}tensor"
            while name in tensors:  # only if a key itself contains "/", e.g. {"a/b": .., "a": {"b": ..}}
                name += "'"
            tensors[name] = value
            return {"__tensor__": name}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {"__dict__": {k: encode(v, f"{path}/{k}" if path else k) for k, v in value.items()}}
            return {"__items__": [[_scalar(k, path), encode(v, f"{path}/{k}" if path else str(k))]
                                  for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            items = [encode(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        return _scalar(value, path)

    structure = encode(obj, "")
    return tensors, structure


def _scalar(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"flatten_state: {type(value).__name__} at {path or '<root>'!r} cannot be stored; "
                    "only tensors, dicts, lists, tuples, str, int, float, bool and None")


def unflatten_state(tensors: dict[str, Tensor], structure: Any) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(structure, list):
        return [unflatten_state(tensors, v) for v in structure]
    if not isinstance(structure, dict):
        return structure
    if len(structure) != 1 or next(iter(structure)) not in _TAGS:
        raise CheckpointError(f"state structure has an untagged mapping {list(structure)[:5]}; "
                              "it was not written by flatten_state")
    tag, body = next(iter(structure.items()))
    if tag == "__tensor__":
        if body not in tensors:
            raise CheckpointError(f"state structure refers to tensor {body!r}, which is not in the checkpoint")
        return tensors[body]
    if tag == "__dict__":
        return {k: unflatten_state(tensors, v) for k, v in body.items()}
    if tag == "__items__":
        return {k: unflatten_state(tensors, v) for k, v in body}
    return tuple(unflatten_state(tensors, v) for v in body)


# --- files -----------------------------------------------------------------------------------------
def _prepare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; copies where storage is shared (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"save_checkpoint: {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        if ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write `tensors` + JSON `meta` to `path` (.safetensors, atomic) and the sidecar `path.with_suffix('.json')`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are .safetensors files; rename it to {path.stem}.safetensors")
    try:
        meta_json = json.dumps(meta, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: meta is not JSON-serializable ({exc})") from exc
    # Serialized here, not by safetensors' save_file: that writes its own ".tmp<random>" next to the target,
    # which a kill would orphan where nothing cleans it; atomic_write's temporary files are cleaned.
    data = save(_prepare(tensors), metadata={META_KEY: meta_json})
    atomic_write_bytes(path, data)
    atomic_write_text(meta_sidecar(path), json.dumps(meta, indent=1))
    return path


def _check_header(path: Path) -> None:
    """Recognise the file type before parsing: pickles are refused, truncation is named as such."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    # A safetensors file is an 8-byte little-endian header length then "{": test that first, since the
    # length's low byte may well be 0x80, which is also how a pickle (protocol >= 2) starts.
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):
        dst = path.with_suffix(".converted.safetensors" if path.suffix == ".safetensors" else ".safetensors")
        raise CheckpointError(f"{path}: pickled checkpoints are refused: convert with `python -m "
                              f"train.checkpoint convert {path} {dst}` (loading a pickle can run code)")
    if len(head) < 9:
        raise CheckpointError(f"{path}: only {size} bytes; the file is empty or truncated, re-save it")
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file (no JSON header); save checkpoints with "
                              "train.checkpoint.save_checkpoint")
    needed = 8 + header_len
    if needed <= size:
        with open(path, "rb") as fh:
            fh.seek(8)
            try:
                header = json.loads(fh.read(header_len))
                needed += max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-save it") from exc
    if needed > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, its header needs {needed}); the write was "
                              "interrupted or the copy is incomplete: re-save it or use an earlier checkpoint")


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read a .safetensors checkpoint -> (tensors on CPU, meta dict; {} if it has none). Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw_meta = (fh.metadata() or {}).get(META_KEY)
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc}); re-save it or use an "
                              "earlier checkpoint") from exc
    try:
        meta = json.loads(raw_meta) if raw_meta else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata {META_KEY!r} is not valid JSON ({exc})") from exc
    if raw_meta:
        _repair_sidecar(meta_sidecar(path), meta)
    return tensors, meta


def _repair_sidecar(sidecar: Path, meta: dict) -> None:
    """Rewrite an existing JSON sidecar that differs from the header (best effort: read-only is fine)."""
    try:
        if not sidecar.is_file() or json.loads(sidecar.read_text(encoding="utf-8")) == meta:
            return
    except (OSError, ValueError):  # unreadable or not JSON: rewrite it
        pass
    try:
        atomic_write_text(sidecar, json.dumps(meta, indent=1))
    except OSError:
        pass


# --- command line -------------------------------------------------------------------------------------
def convert(src: Path, dst: Path) -> Path:
    """Convert a torch.save file to safetensors with the restricted unpickler (tensors and containers only)."""
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors/containers, with varied types
        raise CheckpointError(f"{src}: cannot be loaded with weights_only=True ({exc}); refusing to unpickle "
                              "arbitrary objects") from exc
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return save_checkpoint(dst, obj, {"converted_from": src.name})
    tensors, structure = flatten_state(obj)
    return save_checkpoint(dst, tensors, {"converted_from": src.name, "state_structure": structure})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="print tensor count, size and meta").add_argument("path", type=Path)
    conv = sub.add_parser("convert", help="torch .pt/.pth -> .safetensors (weights_only)")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(f"wrote {convert(args.src, args.dst)}")
    else:
        tensors, meta = load_checkpoint(args.path)
        numel = sum(t.numel() for t in tensors.values())
        print(f"{args.path}: {len(tensors)} tensors, {numel:,} values")
        print(json.dumps({k: v for k, v in meta.items() if k != "state_structure"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))
