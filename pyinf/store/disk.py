"""`DiskStore` (store="disk:PATH"): shards in a directory, resumable; the format below.

On-disk format (version 2) of "disk:PATH"
-----------------------------------------
- `PATH/manifest.json`:
  `{"format": "pyinf-gradient-store", "version": 2, "byteorder": "little",
    "grad_dtype": "float32" | "bfloat16",
    "blocks": [{"name", "rows", "cols"}, ...],        # in storage order
    "fingerprint": hex sha256 of the blocks, grad_dtype, the capture options
                   and the model (see `fingerprint`),
    "batches_per_shard": k, "samples_per_shard": k * (first batch size),
    "shards": [{"index", "file", "start", "count", "batches", "bytes",
                "sha256": hex of the file, "data_sha256": hex of the batches' inputs,
                "skipped": [original sample indices left out under nan_policy="skip"]}],
    "complete": bool, "n": total samples (when complete),
    "factors": (K-FAC methods only) {"file": "factors.bin", "bytes", "sha256",
               "fisher": "empirical" | "true", "seed", "shards": [indices of the shards
               whose statistics the file holds], "tokens": {block: token count}}}`
- `PATH/shard-000000.bin`, ...: shard s holds the gradients of training batches
  `s*k .. s*k + k - 1` (samples `start .. start + count - 1`). The file is the
  blocks one after the other, in manifest order; block b is a C-order array
  `(count, rows, cols)` of little-endian float32 or bfloat16 (raw 16-bit
  words: the top half of a float32), `count * rows * cols * itemsize` bytes.
  `start` and `count` count kept samples; `count + len(skipped)` samples of
  the data went into the shard (a shard may hold 0 samples: an empty file).
  It is read with `numpy.memmap` and `torch.from_numpy`, without copies
  (then one copy to a CUDA device, from pageable memory: no overlap yet).
- `PATH/factors.bin` (kfac/ekfac, `pyinf.factors`): the token sums R = Σ_t p pᵀ
  and C = Σ_t q qᵀ of every block, over the samples of the shards listed in
  its manifest entry: per block in manifest order, the upper triangle (row by
  row, diagonal included) of R, then of C, little-endian float64,
  `(rows(rows+1) + cols(cols+1))/2 * 8` bytes a block. It is rewritten (atomically)
  when the shards written since its last write reach its own size, and when
  the fill completes, so that it costs at most as many bytes of writes as the
  gradients. On resume a reused shard that it does not cover is captured
  again for its statistics only (its gradients are not rewritten), and a
  recomputed shard that it covers adds none; statistics of another kind
  (fisher, seed), or a corrupt file, are recomputed from every shard.
- Writes are atomic: a shard is written to `*.tmp`, fsynced and renamed (and
  the directory fsynced); the manifest is rewritten the same way after each
  finished shard. A `*.tmp` left by a killed write is removed by the next `fill`.
- PATH (`~` expanded) is created if missing; an existing directory holding
  anything but a store's own files (`manifest.json`, `shard-NNNNNN.bin`,
  their `*.tmp`) is refused, never written into.
- An interrupted fit resumes: a new `fill` over the same data keeps every
  shard whose checksum holds and whose batches hash the same, skips those
  batches without capturing them, and recomputes the rest (a corrupted or
  missing shard is recomputed, with a warning); it says how many shards it
  reused (one line on stderr unless progress=False). A manifest from a
  different model, block list, grad_dtype or capture options (a fingerprint
  mismatch), shards whose batches differ from the data given now, or
  gradients that changed (below) are refused with a ValueError (nothing is
  deleted: remove the directory or choose another path).
- What the fingerprint cannot see, the loss function above all, is checked
  by recomputing: the first batch of the first reused shard is captured again
  and must match the stored gradients within the storage precision
  (normwise, per block: 2^-6 in bfloat16, two bf16 ulps; 1e-3 in float32,
  room for a different summation order on other hardware or thread counts).
  A 3x loss, another LoRA scaling or another `mask_padding` is refused; a
  change of the gradients below that tolerance is not seen here.
- A complete store whose shards are all reused is only read (no manifest
  rewrite, no temp files): it can be scored from read-only storage.
- Checksums are verified the first time a process opens a shard, and the
  size on every open (a truncated shard is never read as data): a corrupted
  or truncated shard found while scoring is a ValueError that says to re-run
  `fit`, which recomputes it. A shard recorded with skipped samples is
  refused under nan_policy="error" (naming the sample).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..batches import batch_len
from ..blocks import Block
from ..progress import mode
from .base import Capture, Store, chunk_to_device, default_chunk_size, dtype_name, hash_batch

FORMAT = "pyinf-gradient-store"
FORMAT_VERSION = 2
# Normwise per-block tolerance of the first-batch recompute check (module docstring).
RECOMPUTE_TOL = {torch.float32: 1e-3, torch.bfloat16: 2.0**-6}
_STORE_FILE = re.compile(r"(manifest\.json|shard-\d{6}\.bin|factors\.bin)(\.tmp)?")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, chunks: Iterable) -> None:
    """Write buffers to `path` via a fsynced temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# Shards verified in this process: (path, sha256, size, mtime_ns). A rewritten file has a new key.
_VERIFIED: set[tuple] = set()


def _file_key(path: Path, sha: str) -> tuple:
    st = path.stat()
    return (str(path.resolve()), sha, st.st_size, st.st_mtime_ns)


class DiskStore(Store):
    """Shards in a directory, with a manifest; see the module docstring for the format."""

    kind = "disk"

    def __init__(self, path, blocks, device, grad_dtype, fingerprint, chunk_size=None, progress=None):
        super().__init__(blocks, device, grad_dtype, progress)
        if sys.byteorder != "little":
            raise RuntimeError("the disk store format is little-endian; this host is big-endian")
        self.path = Path(path).expanduser()
        self.fingerprint = fingerprint  # None: not checked (a restore the caller vouches for)
        self.target = int(chunk_size or default_chunk_size(self.blocks, grad_dtype))  # samples per shard
        self.shards: list[dict] = []

    @property
    def _manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def _new_manifest(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "byteorder": "little",
            "grad_dtype": dtype_name(self.grad_dtype),
            "blocks": [{"name": b.name, "rows": b.rows, "cols": b.cols} for b in self.blocks],
            "fingerprint": self.fingerprint,
            "batches_per_shard": None,
            "samples_per_shard": None,
            "shards": [],
            "complete": False,
            "n": None,
        }

    def _read_manifest(self) -> dict | None:
        if not self._manifest_path.exists():
            return None
        try:
            man = json.loads(self._manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{self._manifest_path} is not valid JSON ({err}); delete the directory or choose another path"
            ) from None
        if man.get("format") != FORMAT or man.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{self._manifest_path}: not a pyinf gradient store of version {FORMAT_VERSION} "
                f"(format {man.get('format')!r}, version {man.get('version')!r})"
            )
        stored = [Block(b["name"], b["rows"], b["cols"]) for b in man.get("blocks", [])]
        if set(stored) == set(self.blocks):  # a store written in another block order reads as it is
            self.blocks = stored
        expected = self._new_manifest()
        for key in ("grad_dtype", "blocks", "fingerprint"):
            if man[key] != expected[key] and not (key == "fingerprint" and self.fingerprint is None):
                raise ValueError(
                    f"the gradient store at {self.path} was built from a different model, block list, "
                    f"grad_dtype or capture options ({key} differs); delete the directory or choose another path"
                )
        return man

    def _write_manifest(self, man: dict) -> None:
        man["shards"] = sorted(man["shards"], key=lambda e: e["index"])
        _write_atomic(self._manifest_path, [json.dumps(man, indent=1).encode()])

    def _open(self, e: dict) -> dict[str, torch.Tensor]:
        """A shard as {name: (count, rows, cols)} CPU tensors over a memmap (no copy)."""
        p = self.path / e["file"]
        if not p.exists() or p.stat().st_size != e["bytes"]:
            raise ValueError(f"gradient shard {p} is missing or truncated; run fit() again to recompute it")
        if e["bytes"] == 0:  # every sample of the shard was skipped
            return {b.name: torch.empty(0, b.rows, b.cols, dtype=self.grad_dtype) for b in self.blocks}
        arr = np.memmap(p, dtype=np.uint8, mode="c")  # copy-on-write: writable for torch, file untouched
        key = _file_key(p, e["sha256"])
        if key not in _VERIFIED:
            if hashlib.sha256(arr).hexdigest() != e["sha256"]:
                raise ValueError(f"gradient shard {p} is corrupt (checksum mismatch); run fit() again to recompute it")
            _VERIFIED.add(key)
        raw, off, out = torch.from_numpy(arr), 0, {}
        itemsize = torch.finfo(self.grad_dtype).bits // 8
        for b in self.blocks:
            nbytes = e["count"] * b.size * itemsize
            out[b.name] = raw[off : off + nbytes].view(self.grad_dtype).view(e["count"], b.rows, b.cols)
            off += nbytes
        return out

    def _valid(self, e: dict) -> bool:
        try:
            self._open(e)
            return True
        except ValueError as err:
            warnings.warn(f"{err}: recomputing it", RuntimeWarning, stacklevel=3)
            return False

    def _write_shard(self, index: int, start: int, grads: list[dict], data_sha: str, skipped: list[int]) -> dict:
        arrays = [torch.cat([g[b.name] for g in grads]).cpu().contiguous() for b in self.blocks]
        buffers = [a.reshape(-1).view(torch.uint8).numpy() for a in arrays]
        p = self.path / f"shard-{index:06d}.bin"
        _write_atomic(p, buffers)
        sha = hashlib.sha256()
        for buf in buffers:
            sha.update(buf)
        e = {
            "index": index,
            "file": p.name,
            "start": start,
            "count": int(arrays[0].shape[0]),
            "batches": len(grads),
            "bytes": sum(buf.nbytes for buf in buffers),
            "sha256": sha.hexdigest(),
            "data_sha256": data_sha,
            "skipped": skipped,
        }
        _VERIFIED.add(_file_key(p, e["sha256"]))
        return e

    def _check_directory(self) -> None:
        """Refuse a directory that holds anything but this store's own files."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ValueError(f"the gradient store path {self.path} is a file, not a directory")
        other = sorted(p.name for p in self.path.iterdir() if not _STORE_FILE.fullmatch(p.name))
        if other:
            raise ValueError(
                f"{self.path} is not empty and is not a pyinf gradient store (it holds {other[:3]}"
                f"{'...' if len(other) > 3 else ''}); choose an empty or new directory"
            )

    def _check_recomputed(self, capture: Capture, batch, e: dict, offset: int) -> None:
        """Capture `batch` (the first of shard `e`) again: its gradients must be the stored ones."""
        g, skipped = self._capture(capture, batch, offset)
        stored, end = self._open(e), offset + batch_len(batch)
        same = skipped == [i for i in e.get("skipped", []) if i < end]
        for b in self.blocks if same else ():
            new = g[b.name].float().cpu()
            old = stored[b.name][: new.shape[0]].float()
            same = same and float((new - old).norm()) <= RECOMPUTE_TOL[self.grad_dtype] * float(old.norm())
        if not same:
            raise ValueError(
                f"the gradients differ from those in the gradient store at {self.path} (training samples "
                f"{offset}..{end - 1}, recomputed): a different loss function, LoRA scaling, mask_padding or "
                f"model; delete the directory or choose another path"
            )

    def fill(self, capture, batches):
        self._check_directory()
        self.path.mkdir(parents=True, exist_ok=True)
        man = self._read_manifest() or self._new_manifest()
        for stale in self.path.glob("*.tmp"):  # a write killed before its rename
            stale.unlink(missing_ok=True)
        good = {e["index"]: e for e in man["shards"] if self._valid(e)}
        changed = not man["complete"] or len(good) != len(man["shards"])  # else: nothing to write
        man["shards"], man["complete"], man["n"] = list(good.values()), False, None
        reused, checked = 0, False
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise ValueError("the training data is empty")
        if man["batches_per_shard"] is None:
            b0 = batch_len(first)
            man["batches_per_shard"] = max(1, self.target // b0)
            man["samples_per_shard"] = man["batches_per_shard"] * b0
        k = man["batches_per_shard"]
        it = itertools.chain([first], it)
        start, orig, index = 0, 0, -1  # kept and original sample counts so far
        covered = self._read_factors(man)  # shards whose K-FAC statistics factors.bin holds (loaded)
        recorded, pending, refreshed = set(covered), 0, 0
        with self._batches_bar(batches) as pb:
            for index in itertools.count():
                group = list(itertools.islice(it, k))  # the batches of shard `index`
                if not group:
                    break
                data_sha = hashlib.sha256("".join(hash_batch(b) for b in group).encode()).hexdigest()
                count = sum(batch_len(b) for b in group)
                e = good.get(index)
                if e is not None:  # finished before: skip its batches without capturing them
                    skipped = e.get("skipped", [])
                    if (e["data_sha256"], e["start"], e["count"] + len(skipped)) != (data_sha, start, count):
                        raise ValueError(
                            f"the training data (or batch size) differs from the data the gradient store at "
                            f"{self.path} was built from (shard {index}); delete the directory or choose another path"
                        )
                    if skipped and self.nan_policy != "skip":
                        raise ValueError(
                            f"train gradient of sample {skipped[0]} contains NaN or Inf (the gradient store at "
                            f"{self.path} was built with nan_policy='skip')"
                        )
                    if not checked:
                        self._check_recomputed(capture, group[0], e, orig)
                        checked = True
                    if self.factors is not None and index not in covered:  # captured again for its statistics
                        with self._accumulating():
                            offset = orig
                            for b in group:
                                self._capture(capture, b, offset)
                                offset += batch_len(b)
                        covered.add(index)
                        refreshed += 1
                    reused += 1
                else:
                    grads, skipped, offset = [], [], orig
                    with self._accumulating(index not in covered):  # a recomputed shard's statistics may be in
                        for b in group:
                            g, sk = self._capture(capture, b, offset)
                            grads.append(g)
                            skipped += sk
                            offset += batch_len(b)
                    good[index] = e = self._write_shard(index, start, grads, data_sha, skipped)
                    man["shards"].append(e)
                    if self.factors is not None:
                        covered.add(index)
                        pending += e["bytes"]
                        if pending >= self.factors.nbytes:  # factor writes at most double the bytes written
                            self._write_factors(man, covered)
                            recorded, pending = set(covered), 0
                    self._write_manifest(man)  # after each finished shard: a kill loses one shard at most
                    changed = True
                start += e["count"]
                orig += count
                pb.update(len(group))
        n_shards = index
        if any(i >= n_shards for i in good):
            raise ValueError(
                f"the training data has fewer batches than the data the gradient store at {self.path} was "
                f"built from; delete the directory or choose another path"
            )
        if start == 0:
            raise ValueError(f"every training sample ({orig}) was skipped for NaN/Inf gradients")
        man["complete"], man["n"] = True, start
        if self.factors is not None and covered != recorded:
            self._write_factors(man, covered)
            changed = True
        if changed:
            self._write_manifest(man)
        if reused and mode(self.progress) != "off":
            again = f" (and {refreshed} of them again for their K-FAC statistics)" if refreshed else ""
            print(f"pyinf: gradient store {self.path}: reused {reused} of {n_shards} shards from an earlier fit, "
                  f"captured {n_shards - reused}{again}", file=sys.stderr, flush=True)
        self._load(man)
        return self

    def _read_factors(self, man: dict) -> set[int]:
        """Load factors.bin into `self.factors` when its statistics are of the same kind (fisher, seed) and its
        checksum holds; the shard indices it covers (empty: start from zero)."""
        entry = man.get("factors")
        if self.factors is None or entry is None:
            return set()
        if (entry["fisher"], entry["seed"]) != (self.factors.fisher, self.factors.seed):
            return set()
        p = self.path / entry["file"]
        raw = np.fromfile(p, dtype=np.uint8) if p.exists() else np.zeros(0, dtype=np.uint8)
        if raw.nbytes != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            warnings.warn(f"{p} is missing or corrupt: recomputing the K-FAC statistics", RuntimeWarning, stacklevel=3)
            return set()
        self.factors.load_triangles(raw, entry["tokens"])
        return set(entry["shards"])

    def _write_factors(self, man: dict, covered: set[int]) -> None:
        """factors.bin (atomic) and its manifest entry; the manifest itself is written by the caller."""
        sha, size = hashlib.sha256(), 0

        def buffers():
            nonlocal size
            for buf in self.factors.triangles():
                sha.update(buf.tobytes())
                size += buf.nbytes
                yield buf.tobytes()

        _write_atomic(self.path / "factors.bin", buffers())
        man["factors"] = {"file": "factors.bin", "bytes": size, "sha256": sha.hexdigest(),
                          "fisher": self.factors.fisher, "seed": self.factors.seed, "shards": sorted(covered),
                          "tokens": self.factors.token_counts()}

    def _load(self, man: dict) -> None:
        self.shards = sorted(man["shards"], key=lambda e: e["index"])
        self.n = man["n"]
        self.chunk_size = max(1, max(e["count"] for e in self.shards))
        self.skipped = [i for e in self.shards for i in e.get("skipped", [])]

    def _chunks(self, blocks, first=0):
        for e in self.shards:
            if e["count"] and e["start"] + e["count"] > first:
                shard = self._open(e)
                yield e["start"], chunk_to_device({b.name: shard[b.name] for b in blocks}, blocks, self.device)

    def state(self):
        return {"kind": self.kind, "path": str(self.path.resolve())}

    @classmethod
    def restore(cls, state, blocks, device, grad_dtype, progress=None, fingerprint=None, **_):
        """The store `state()` described, reopened from its directory (complete, same fingerprint)."""
        self = cls(state["path"], blocks, device, grad_dtype, fingerprint, progress=progress)
        man = self._read_manifest()
        if man is None or not man["complete"]:
            raise ValueError(f"the gradient store at {self.path} is missing or incomplete; fit again")
        self._load(man)
        return self


# -- none ------------------------------------------------------------------
