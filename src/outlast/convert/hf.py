"""Hugging Face safetensors checkpoints: read (single or sharded) and write (sharded by size).

The layout is the one ``transformers``' ``save_pretrained`` writes and ``from_pretrained``
reads: ``model.safetensors`` for one file; ``model-00001-of-0000N.safetensors`` files plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
{name: file}}``) for several. Each file carries ``{"format": "pt"}`` metadata, which
``transformers`` requires. Tensors are read with ``safetensors.safe_open`` one at a time
and written with outlast's streaming :class:`~outlast.storage.local.ShardWriter`.
``config.json``/tokenizer files are not part of the weights: write them next to the
export yourself (``config.save_pretrained(dst)``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ..storage.local import ShardWriter, remove_tree
from ..writer import TensorSpec, plan_files
from .core import Source, commit_foreign, foreign_tmp, progress_bar

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _find_files(path: str) -> tuple[dict[str, str] | None, list[str], str | None]:
    """(weight_map or None, the shard files in order, the index file or None)."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise UnsupportedFormatError(f"{path} is not a .safetensors file or a directory of them")
        return None, [path], None
    index = os.path.join(path, INDEX_FILE)
    if not os.path.exists(index):
        others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        index = os.path.join(path, others[0]) if len(others) == 1 else index
    if os.path.exists(index):
        try:
            with open(index, "rb") as f:
                raw = json.load(f)
            weight_map = raw["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise CorruptCheckpointError(
                f"{index} is not a safetensors index (expected JSON with a 'weight_map' of name -> file)"
            ) from None
        files = list(dict.fromkeys(weight_map.values()))
        for rel in files:
            if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
                raise CorruptCheckpointError(f"{index} names shard {rel!r} outside {path}")
            if not os.path.isfile(os.path.join(path, rel)):
                names = [k for k, v in weight_map.items() if v == rel]
                raise CorruptCheckpointError(
                    f"{index} names shard {rel}, which is missing from {path} (it holds {len(names)} "
                    f"tensor(s), e.g. {names[0]!r}); download or copy the missing file"
                )
        return weight_map, [os.path.join(path, f) for f in files], index
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return None, [single], None
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
        return None, [os.path.join(path, found[0])], None
    what = f"{len(found)} .safetensors files but no index" if found else "no .safetensors files"
    raise CorruptCheckpointError(
        f"{path} is not a Hugging Face checkpoint: no {SINGLE_FILE} or {INDEX_FILE}, and {what}"
    )


class HFSource(Source):
    """A Hugging Face safetensors checkpoint (one file, or shards with an index).

    Names are the keys as stored (``model.embed_tokens.weight``); each is one flat key of
    the nested state (path ``[name]``), as ``outlast.save`` stores a ``state_dict()``.
    """

    format = "hf"

    def __init__(self, path: str):
        from safetensors import safe_open

        super().__init__(path)
        weight_map, files, index = _find_files(path)
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        for fp in files:
            try:
                h = safe_open(fp, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CorruptCheckpointError(f"{fp} is not a valid safetensors file: {e}") from None
            self._handles[fp] = h
            for key in h.keys():
                if weight_map is not None and weight_map.get(key) is not None and os.path.join(path, weight_map[key]) != fp:
                    continue  # the index says another shard holds it
                if key in self._file_of:
                    raise CorruptCheckpointError(f"tensor {key!r} is stored in both {self._file_of[key]} and {fp}")
                sl = h.get_slice(key)
                self.specs.append(TensorSpec(key, sl.get_dtype(), tuple(sl.get_shape()), (key,)))
                self._file_of[key] = fp
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self._file_of]
            if lost:
                raise CorruptCheckpointError(
                    f"{index} names {len(lost)} tensor(s) that are not in their shard files, e.g. "
                    f"{lost[0]!r} in {weight_map[lost[0]]}"
                )

    def read(self, fqn: str) -> torch.Tensor:
        try:
            fp = self._file_of[fqn]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {fqn!r}") from None
        try:
            return self._handles[fp].get_tensor(fqn)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"reading tensor {fqn!r} from {fp} failed: {e}") from None

    def close(self) -> None:
        self._handles.clear()


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards, as ``save_pretrained`` names them."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_hf(src: Source, dst: str, *, overwrite: bool, progress: bool | None, max_shard_size: int) -> list[str]:
    """Write ``src``'s tensors as a Hugging Face checkpoint at ``dst`` (plain values are dropped).

    Returns the files written (relative names).
    """
    specs = src.specs
    file_of = plan_files([s.nbytes for s in specs], max_shard_size)
    names = shard_names(max(file_of) + 1 if specs else 1)
    tmp = foreign_tmp(dst, overwrite, (SINGLE_FILE, INDEX_FILE))
    bar = progress_bar(src.nbytes, f"{src.format} -> hf", progress)
    writer: ShardWriter | None = None
    current = -1
    try:
        if not specs:
            ShardWriter(os.path.join(tmp, names[0]), [], metadata={"format": "pt"}).close()
        for k, (spec, t) in enumerate(src.iter_tensors()):
            i = file_of[k]
            if i != current:
                if writer is not None:
                    writer.close()
                members = [s for s, f in zip(specs, file_of) if f == i]
                writer = ShardWriter(os.path.join(tmp, names[i]), [(s.fqn, s.dtype, s.shape, s.nbytes) for s in members],
                                     metadata={"format": "pt"})
                current = i
            writer.write(spec.fqn, t.detach().contiguous())
            bar.update(spec.nbytes)
            del t
        if writer is not None:
            writer.close()
            writer = None
        if len(names) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": {s.fqn: names[f] for s, f in sorted(zip(specs, file_of), key=lambda x: x[0].fqn)},
            }
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        commit_foreign(tmp, dst, overwrite)
    except BaseException:
        if writer is not None:
            writer.abort()
        remove_tree(tmp)
        raise
    finally:
        bar.close()
    return names + ([INDEX_FILE] if len(names) > 1 else [])
