"""Scores on disk: an (m, n) score matrix too large for memory, written chunk by chunk and resumable.

    sf = att.score(query_data, out="run/scores")   # a ScoreFile (the directory is created)
    top = sf.top_k(10)                             # TopK per query: (m, 10) tensors, bounded memory
    per_train = sf.top_k(10, per="train")          # per training point: its (n, 10) extreme queries
    S = sf.array                                   # read-only np.memmap, (m, n) (a transposed view)

A score file is a directory:

- `scores.f32`: float32 scores, TRAIN-MAJOR: the `(n, m)` transpose of the
  `(m, n)` matrix, row i = training point i against every query. The scoring
  pass yields the columns of a chunk of training points (`Method.score_chunks`),
  which are then one contiguous write; both top-k reductions read the file
  once, in order, `block_bytes` at a time.
- `header.json`: format, version, `shape` [m, n], `dtype`, `layout`, `meta`
  (what the scores depend on: method, the Attributor's config but its store
  and progress settings, the model's fingerprint, a digest of the query data,
  n and the skipped training points), `skipped` (training points whose rows are NaN, `nan_policy="skip"`),
  `written` (the ranges `[start, stop)` of the scoring pass's samples whose
  rows are on disk) and `complete`.
- `H.pt`: the preconditioned queries `{block: (m, D_b)}` while the file is
  incomplete (`torch.save`, CPU); removed when the last chunk is written. Its
  size is that of the query gradients (float64 for exact and hyperinf: m × D × 8
  bytes, 5.2 GB at m = 100 on the 13B LoRA shape).

Crash safety: after each chunk the rows are flushed to the file (`memmap.flush`)
before the header that lists them replaces the old one (a fsynced temporary
and an atomic rename), so a header never claims a row that is not on disk.

Resume: scoring again into an incomplete file whose `meta` equals the new
run's loads `H.pt` (no query capture, no precondition passes) and starts the
pass at the first missing sample: the stores read nothing before that chunk
(`GradientSource.chunks(start=...)`; store="none" does not capture those
batches). A file of another run (different meta) is refused; a complete file
of the same run is returned as is. An out-of-memory retry of the pass
(`pyinf.oom`) resumes the same way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

FORMAT = "pyinf-scores"
VERSION = 1
DATA = "scores.f32"
HEADER = "header.json"
PRECONDITIONED = "H.pt"
LAYOUT = "train-major: scores.f32 is the (n, m) transpose of the (m, n) scores, row i = training point i"
BLOCK_BYTES = 64 << 20  # rows of the file read at once by top_k


def _as_json(obj):
    """`obj` as it reads back from JSON (tuples as lists, dtypes and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def digest_batches(batches: Iterable) -> tuple[str, int]:
    """(sha256 over the batches' tensors (`pyinf.store.hash_batch`), number of samples) of query data."""
    import hashlib

    from .batches import batch_len
    from .store import hash_batch

    h, m = hashlib.sha256(), 0
    for batch in batches:
        h.update(hash_batch(batch).encode())
        m += batch_len(batch)
    return h.hexdigest(), m


class ScoreFile:
    """An (m, n) float32 score matrix in a directory (module docstring); `ScoreFile(path)` opens one.

    Attributes: `path`, `shape` (m, n), `header` (the parsed header.json),
    `complete`, `resume_at` (the first sample of the scoring pass not written).
    """

    def __init__(self, path):
        self.path = Path(path)
        head = self.path / HEADER
        if not head.is_file():
            raise ValueError(f"{self.path} is not a pyinf score file (no {HEADER})")
        self.header = json.loads(head.read_text())
        if self.header.get("format") != FORMAT or self.header.get("version") != VERSION:
            raise ValueError(f"{self.path}: not a pyinf score file of version {VERSION}")
        m, n = self.header["shape"]
        data = self.path / DATA
        if not data.is_file() or data.stat().st_size != m * n * 4:
            raise ValueError(f"{data} is missing or has the wrong size for ({m}, {n}) float32 scores")
        self.shape = (m, n)
        skipped = np.zeros(n, dtype=bool)
        skipped[self.header["skipped"]] = True
        self._kept = np.flatnonzero(~skipped)  # row of each sample of the scoring pass
        self._rw: np.memmap | None = None

    # -- writing ----------------------------------------------------------
    @classmethod
    def create_or_resume(cls, path, *, shape: tuple[int, int], meta: dict, skipped: list[int] = ()) -> "ScoreFile":
        """The score file at `path` for a run described by `meta` (JSON-able): a new one (rows of
        `skipped` training points NaN), or the incomplete (or complete) one of the same run."""
        path = Path(path)
        meta = _as_json(meta)
        if (path / HEADER).exists():
            sf = cls(path)
            if sf.header["meta"] != meta or tuple(sf.shape) != tuple(shape):
                old = sf.header["meta"]
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k)) or ["shape"]
                raise ValueError(
                    f"{path} holds the scores of another run (it differs in {diff}); choose another path, or "
                    f"delete it to score again"
                )
            return sf
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{path} exists and is not a pyinf score file; choose a new or empty directory")
        m, n = shape
        path.mkdir(parents=True, exist_ok=True)
        with open(path / DATA, "wb") as f:
            f.truncate(m * n * 4)  # sparse until written
        if len(skipped):
            arr = np.memmap(path / DATA, dtype=np.float32, mode="r+", shape=(n, m))
            arr[list(skipped)] = np.nan
            arr.flush()
            del arr
        _write_json(path / HEADER, {
            "format": FORMAT, "version": VERSION, "shape": [m, n], "dtype": "float32", "layout": LAYOUT,
            "meta": meta, "skipped": sorted(int(i) for i in skipped), "written": [], "complete": False,
        })
        return cls(path)

    @property
    def complete(self) -> bool:
        """Whether every row has been written."""
        return bool(self.header["complete"])

    @property
    def resume_at(self) -> int:
        """The first sample of the scoring pass whose row is not written (the pass resumes there)."""
        w = self.header["written"]
        return w[0][1] if w and w[0][0] == 0 else 0

    def saved_preconditioned(self, device) -> dict[str, torch.Tensor] | None:
        """The H {block: (m, D_b)} an interrupted run saved (on `device`), or None."""
        p = self.path / PRECONDITIONED
        if self.complete or not p.is_file():
            return None
        return {k: v.to(device) for k, v in torch.load(p, map_location="cpu", weights_only=True).items()}

    def save_preconditioned(self, H: dict[str, torch.Tensor]) -> None:
        """Keep H {block: (m, D_b)} for a resume (atomic: a partial H.pt is never read)."""
        p = self.path / PRECONDITIONED
        tmp = p.with_name(p.name + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in H.items()}, tmp)
        os.replace(tmp, p)

    def write(self, start: int, cols: torch.Tensor) -> None:
        """Scores `cols` (m, c) of the pass's samples start..start+c-1: rows written, flushed, recorded."""
        m, n = self.shape
        c = cols.shape[-1]
        if cols.dim() != 2 or cols.shape[0] != m or not 0 <= start <= len(self._kept) - c:
            raise ValueError(f"cannot write scores of shape {tuple(cols.shape)} at sample {start} of a {self.shape} file")
        if self._rw is None:
            self._rw = np.memmap(self.path / DATA, dtype=np.float32, mode="r+", shape=(n, m))
        rows = cols.detach().float().T.cpu().numpy()
        if len(self._kept) == n:
            self._rw[start : start + c] = rows
        else:
            self._rw[self._kept[start : start + c]] = rows
        self._rw.flush()  # the rows are on disk before the header says so
        self.header["written"] = _add_range(self.header["written"], start, start + c)
        self.header["complete"] = self.header["written"] == [[0, len(self._kept)]]
        _write_json(self.path / HEADER, self.header)
        if self.complete:
            self._rw = None
            (self.path / PRECONDITIONED).unlink(missing_ok=True)

    def write_pass(self, chunks: Iterator[tuple[int, torch.Tensor]]) -> "ScoreFile":
        """Write every `(start, (m, c))` chunk of a scoring pass; refuses to end incomplete."""
        for start, cols in chunks:
            self.write(start, cols)
        if not self.complete:
            raise RuntimeError(f"the scoring pass ended with {self.path} incomplete (written: {self.header['written']})")
        return self

    # -- reading ----------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The (m, n) scores as a read-only memmap (a transposed view of the train-major file)."""
        m, n = self.shape
        return np.memmap(self.path / DATA, dtype=np.float32, mode="r", shape=(n, m)).T

    def tensor(self) -> torch.Tensor:
        """The whole (m, n) float32 matrix in memory (for scores that fit)."""
        return torch.from_numpy(np.ascontiguousarray(self.array))

    def _row_blocks(self, block_bytes: int):
        """(first row, (r, m) float32 tensor) over the file in order, about `block_bytes` at a time."""
        self._check_complete()
        m, n = self.shape
        arr = np.memmap(self.path / DATA, dtype=np.float32, mode="r", shape=(n, m))
        step = max(1, block_bytes // (4 * m))
        for lo in range(0, n, step):
            yield lo, torch.from_numpy(np.array(arr[lo : lo + step]))

    def top_k(self, k: int, per: str = "query", block_bytes: int = BLOCK_BYTES):
        """The k most helpful (most negative) and most harmful scores, as a `pyinf.attributor.TopK`.

        per="query": for each query, over the training points: (m, k) tensors, as
        `Attributor.score(top_k=k)` (skipped training points never returned).
        per="train": for each training point, over the queries: (n, k) tensors;
        the rows of skipped points are NaN with index -1. One read of the file;
        memory: the (m or n, k) results and `block_bytes` of rows.
        """
        from .attributor import TopK, _merge_top

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if per not in ("query", "train"):
            raise ValueError(f"per must be 'query' or 'train', got {per!r}")
        m, n = self.shape
        skipped = torch.zeros(n, dtype=torch.bool)
        skipped[self.header["skipped"]] = True
        if per == "train":
            kk = min(k, m)
            hv, av = torch.empty(n, kk), torch.empty(n, kk)
            hi, ai = torch.empty(n, kk, dtype=torch.long), torch.empty(n, kk, dtype=torch.long)
            for lo, X in self._row_blocks(block_bytes):
                rows = slice(lo, lo + X.shape[0])
                hv[rows], hi[rows] = X.topk(kk, dim=1, largest=False, sorted=True)
                av[rows], ai[rows] = X.topk(kk, dim=1, largest=True, sorted=True)
            hi[skipped], ai[skipped] = -1, -1
            return TopK(hv, hi, av, ai)
        hv = av = torch.empty(m, 0)
        hi = ai = torch.empty(m, 0, dtype=torch.long)
        for lo, X in self._row_blocks(block_bytes):
            keep = ~skipped[lo : lo + X.shape[0]]
            cols, idx = X[keep].T, torch.arange(lo, lo + X.shape[0])[keep].expand(m, -1)
            hv, hi = _merge_top(hv, hi, cols, idx, k, largest=False)
            av, ai = _merge_top(av, ai, cols, idx, k, largest=True)
        return TopK(hv, hi, av, ai)

    def _check_complete(self) -> None:
        if not self.complete:
            raise ValueError(f"{self.path} is incomplete (written: {self.header['written']}); score again into it "
                             f"to resume")

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"incomplete, resumes at sample {self.resume_at}"
        return f"ScoreFile({str(self.path)!r}, shape={self.shape}, {state})"


def _add_range(ranges: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    """Sorted, merged `[start, stop)` ranges with [lo, hi) added."""
    out: list[list[int]] = []
    for a, b in sorted([*map(list, ranges), [lo, hi]]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out
