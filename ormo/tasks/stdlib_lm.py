"""A byte-level causal language model on the Python standard library's own source files: offline, on every machine.

``[task] entry = "ormo.tasks.stdlib_lm:StdlibLM"`` (options below; ``preset:lm/stdlib`` compares methods on it).

**Corpus.** The ``*.py`` files directly in the running interpreter's standard-library folder (``sysconfig``'s
``stdlib``; option ``source_dir`` reads another folder), sorted by name. File k (0-based, in that order) belongs to
the validation split when ``k % 10 == 8``, to the test split when ``k % 10 == 9``, and to training otherwise; a split
is its files' bytes concatenated in order. :meth:`StdlibLM.describe` (recorded in run.json) names the Python version,
the folder, the files and bytes per split and a sha256 of every file's name and contents: a run reproduces exactly
when the same corpus is read (another Python version ships other files, so other numbers).

**Model.** A fixed-window neural byte model (Bengio et al., 2003, "A neural probabilistic language model"): each of
the previous ``context`` bytes embedded in ``embed_dim`` dimensions, the embeddings concatenated, one hidden layer of
``hidden`` GELU units, and 256 logits for the next byte. No dropout, no normalisation layers: a gradient is a
deterministic function of the parameters and the minibatch.

**Training examples.** An example is ``context + seq_len`` consecutive training bytes starting at an offset drawn
uniformly from the keyed generator of (seed, worker, index, step); its last ``seq_len`` bytes are each predicted from
the ``context`` bytes before them, so the loss is the mean cross-entropy of ``batch_size × seq_len`` next-byte
predictions. An epoch is ``train bytes / seq_len`` examples (as many predictions as the split has bytes).

**Metrics.** ``loss``: the mean cross-entropy per predicted byte in nats (ln 256 = 5.55 for a uniform guess), and
``ppl``: the perplexity exp(loss); both lower is better, on ``eval_sequences`` fixed sequences at evenly spaced
offsets of the validation and test splits (``eval_sequences × seq_len`` predictions each).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..task import Metric, ModelTask, TaskContext, seeded

#: file k of the sorted list goes to validation when k % SPLIT_EVERY == VAL_SLOT, to test at TEST_SLOT
SPLIT_EVERY, VAL_SLOT, TEST_SLOT = 10, 8, 9
#: The most values the model's parameters, or one layer's activations, may hold (1 GiB of float32).
MAX_ELEMENTS = 2**28


class ByteMLP(nn.Module):
    """Next-byte logits from the ``context`` bytes before each position (a fixed-window MLP language model)."""

    def __init__(self, *, context: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, embed_dim)
        self.hidden = nn.Linear(context * embed_dim, hidden)
        self.out = nn.Linear(hidden, 256)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, context + L) byte values -> (B, L, 256) logits of bytes ``context .. context + L - 1``."""
        e = self.embed(x)  # (B, T, E): each byte embedded once, then windowed (no copy per window until reshape)
        windows = e.unfold(1, self.context, 1)[:, :-1]  # (B, L, E, context): the window before each target
        h = F.gelu(self.hidden(windows.reshape(*windows.shape[:2], -1)))
        return self.out(h)


def corpus_files(source_dir: Path) -> list[Path]:
    """The corpus: the ``*.py`` files directly in ``source_dir``, sorted by name."""
    return sorted(p for p in source_dir.glob("*.py") if p.is_file())


class StdlibLM(ModelTask):
    """The byte-level language model task (see the module docstring)."""

    metrics = (Metric("loss", higher_is_better=False, label="loss (nats/byte)"),
               Metric("ppl", higher_is_better=False, label="perplexity"))
    primary_metric = "ppl"

    def __init__(self, context: TaskContext, *, context_bytes: int = 32, seq_len: int = 32, embed_dim: int = 16,
                 hidden: int = 256, eval_sequences: int = 64, source_dir: str | None = None) -> None:
        for name, value in (("context_bytes", context_bytes), ("seq_len", seq_len), ("embed_dim", embed_dim),
                            ("hidden", hidden), ("eval_sequences", eval_sequences)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"invalid task.options.{name}: {value!r} (must be an integer >= 1)")
        # a toy model: sizes that would need gigabytes are a typo (10**9 would try to allocate them, or be killed)
        params = 256 * embed_dim + (context_bytes * embed_dim + 1) * hidden + (hidden + 1) * 256
        if params > MAX_ELEMENTS:
            raise ConfigError(f"invalid task.options: context_bytes = {context_bytes}, embed_dim = {embed_dim} and "
                              f"hidden = {hidden} make a model of {params:,} parameters (at most {MAX_ELEMENTS:,}, "
                              f"1 GiB of float32); lower them")
        rows = max(context.batch_size, eval_sequences) * seq_len
        widest = rows * max(context_bytes * embed_dim, hidden, 256)
        if widest > MAX_ELEMENTS:
            raise ConfigError(f"invalid task.options: a forward pass of max(data.batch_size = {context.batch_size}, "
                              f"eval_sequences = {eval_sequences}) x seq_len = {seq_len} predictions holds "
                              f"{widest:,} values in one layer (at most {MAX_ELEMENTS:,}, 1 GiB of float32); lower "
                              f"them")
        folder = Path(source_dir).expanduser() if source_dir is not None else Path(sysconfig.get_paths()["stdlib"])
        files = corpus_files(folder)
        if len(files) < SPLIT_EVERY:
            raise ConfigError(f"invalid task.options.source_dir: {str(folder)!r} holds {len(files)} .py files; the "
                              f"split by file needs at least {SPLIT_EVERY} (give a folder with more)")
        digest = hashlib.sha256()
        parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
        for k, path in enumerate(files):
            data = path.read_bytes()
            # the name's bytes on disk: .encode() fails on a name that is not UTF-8 (undecodable bytes as surrogates)
            digest.update(os.fsencode(path.name) + b"\0" + len(data).to_bytes(8, "little") + data)
            split = "val" if k % SPLIT_EVERY == VAL_SLOT else "test" if k % SPLIT_EVERY == TEST_SLOT else "train"
            parts[split].append(data)
        self.corpus = {
            "source": "python standard library" if source_dir is None else "source_dir",
            "python": platform.python_version(), "folder": str(folder), "sha256": digest.hexdigest(),
            "files": {s: len(v) for s, v in parts.items()}, "bytes": {s: sum(map(len, v)) for s, v in parts.items()},
            "split": f"file k (sorted by name): validation if k % {SPLIT_EVERY} == {VAL_SLOT}, test if "
                     f"k % {SPLIT_EVERY} == {TEST_SLOT}, else training",
        }
        device = torch.device(context.device)
        self.span = context_bytes + seq_len  # bytes per example
        self.seq_len, self.eval_sequences = seq_len, eval_sequences
        self.data: dict[str, Tensor] = {}
        for split, chunks in parts.items():
            if split == "test" and not context.eval_test:
                continue  # a tuning run: the test split is dropped right after reading (hashed, never kept)
            data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
            if data.numel() < self.span + 1:
                raise ConfigError(f"the {split} split of {str(folder)!r} has {data.numel()} bytes, fewer than one "
                                  f"example (context_bytes + seq_len = {self.span}); lower them or add files")
            self.data[split] = data.to(device)
        model = seeded(context.seed, lambda: ByteMLP(context=context_bytes, embed_dim=embed_dim, hidden=hidden))
        train_size = max(1, self.data["train"].numel() // seq_len)
        super().__init__(model, context, train_size=train_size, splits=("val", "test"))
        self._offsets = torch.arange(self.span, device=device)

    def describe(self) -> dict[str, Any]:
        return dict(self.corpus)

    def _sequences(self, split: str, starts: Tensor) -> Tensor:
        """(len(starts), context + seq_len) byte values of ``split`` from each start offset."""
        return self.data[split][starts[:, None] + self._offsets].long()

    def batch(self, worker: int, index: int, step: int) -> Tensor:
        num_starts = self.data["train"].numel() - self.span + 1
        starts = self.minibatch_indices(worker, index, step, num_examples=num_starts).to(self.device)
        return self._sequences("train", starts)

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        logits = model(batch)
        return F.cross_entropy(logits.reshape(-1, 256), batch[:, -self.seq_len:].reshape(-1))

    def evaluate_model(self, model: nn.Module, split: str) -> dict[str, float]:
        last = self.data[split].numel() - self.span
        starts = torch.linspace(0, last, self.eval_sequences, dtype=torch.float64).round().long().to(self.device)
        x = self._sequences(split, starts)
        loss = float(F.cross_entropy(model(x).reshape(-1, 256), x[:, -self.seq_len:].reshape(-1)))
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}  # exp overflows past ~709: a diverged model
