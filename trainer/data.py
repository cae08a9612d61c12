"""Datasets: built-in (generated, shipped in a package, or committed to the repo) and user CSV/NPZ files.

Built-ins need no download:
- ``blobs``: generated 5-class Gaussian clusters in 20 dimensions (tabular classification);
- ``digits``: scikit-learn's 8x8 handwritten digits, 1,797 images shipped inside the package;
- ``corpus``: ~120 KB of the Python Language Reference committed in trainer/corpus (character LM).

A user CSV has a header row, numeric feature columns and a target column (``label`` unless told
otherwise); integer targets mean classification, other numbers regression. An NPZ holds arrays ``x``
(samples first) and ``y``. A ``.txt`` file is a corpus for the language model.
"""

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from trainmetrics.contract import BUILTIN_DATASETS
from trainmetrics.datafiles import DatasetError, TargetColumnError, eval_rows, read_csv, read_npz

CORPUS_PATH = Path(__file__).parent / "corpus" / "python_reference.txt"
LM_BLOCK_SIZE = 64


@dataclass
class Dataset:
    """Train and eval splits plus what a model needs to know about them."""

    name: str
    task: str                     # "classification", "regression" or "language"
    train: TensorDataset
    eval: TensorDataset
    input_shape: tuple[int, ...]  # one sample's shape
    num_outputs: int              # classes, 1 for regression, vocabulary size for language

    @property
    def task_said(self) -> str:
        """The task as the job's log says it: which one a CSV's target made (whole numbers written as decimals,
        `1.0`, as pandas writes a column with a gap, are a regression target) is not to be guessed."""
        if self.task == "classification":
            # The model has a class per label up to the largest; a CSV's labels may skip some ({0, 7}: 8 outputs,
            # said as 8 classes of which the data holds 2).
            found = len(torch.unique(torch.cat([self.train.tensors[1], self.eval.tensors[1]])))
            if found == self.num_outputs:
                return f"classification ({found} classes)"
            return f"classification ({found} classes, labels 0 to {self.num_outputs - 1})"
        return f"language ({self.num_outputs} characters)" if self.task == "language" else self.task

    @property
    def is_image(self) -> bool:
        """True when samples are (channels, height, width) images."""
        return len(self.input_shape) == 3

    @cached_property
    def digest(self) -> str:
        """A fingerprint of the data as trained on: its splits' samples and targets, in order. A checkpoint holds
        it, and a resume on other data under the same name (another file of that stem, the file changed, another
        --target) is refused: the name alone let it go on at the old position in a shuffle of other data."""
        digest = hashlib.blake2b(self.task.encode(), digest_size=16)
        for split in (self.train, self.eval):
            for tensor in split.tensors:
                tensor = tensor.contiguous()
                digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
                digest.update(tensor.numpy().data.cast("B"))
        return digest.hexdigest()


def load_dataset(spec: str, target: str = "label", seed: int = 0) -> Dataset:
    """Load a built-in dataset by name or a user file by path (.csv, .npz, .txt). A file's dataset is named by
    its stem, as the job server names an upload (`ds-<hex>`, stored as `ds-<hex>.csv`)."""
    if spec == "blobs":
        return _split("blobs", *_make_blobs(seed), seed=seed)
    if spec == "digits":
        return _digits(seed)
    if spec == "corpus":
        return _language("corpus", CORPUS_PATH.read_text(encoding="utf-8"))
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npz", ".txt"):
        raise DatasetError(f"unknown dataset {spec!r}: use one of {', '.join(BUILTIN_DATASETS)} "
                           "or a path to a .csv, .npz or .txt file")
    if not path.is_file():
        raise DatasetError(f"dataset {spec}: {'a directory, not a file' if path.is_dir() else 'file not found'}")
    if suffix == ".csv":
        try:
            x, y = read_csv(path, target)
        except TargetColumnError as error:
            raise DatasetError(f"--target: {error}") from None
    elif suffix == ".npz":
        x, y = read_npz(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DatasetError(f"{path}: not UTF-8 text ({error.reason})") from None
        return _language(path.stem, text, where=str(path))
    return _split(path.stem, x, y, seed=seed)


def _make_blobs(seed: int, samples: int = 4000, features: int = 20, classes: int = 5):
    generator = np.random.default_rng(seed)
    centers = generator.normal(0.0, 1.0, size=(classes, features))
    y = generator.integers(0, classes, size=samples)
    x = centers[y] + generator.normal(0.0, 1.5, size=(samples, features))
    return x.astype(np.float32), y.astype(np.int64)


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits  # the images ship inside the package: no download

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]   # (N, 1, 8, 8), scaled to 0..1
    return _split("digits", x, digits.target.astype(np.int64), seed=seed)


def _split(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(x))
    n_eval = eval_rows(len(x))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    classification = y.dtype == np.int64
    if not classification:
        yt = yt.unsqueeze(1)
    return Dataset(
        name=name,
        task="classification" if classification else "regression",
        train=TensorDataset(xt[train_idx], yt[train_idx]),
        eval=TensorDataset(xt[eval_idx], yt[eval_idx]),
        input_shape=tuple(x.shape[1:]),
        num_outputs=int(y.max()) + 1 if classification else 1,
    )


def _language(name: str, text: str, block_size: int = LM_BLOCK_SIZE, where: str | None = None) -> Dataset:
    """A character-level language dataset named `name`; `where`: the file, as its problems name it (its stem
    alone, "empty: corpus too short", left the user to guess which file)."""
    where = where or name
    vocabulary = sorted(set(text))
    if len(text) < 4 * (block_size + 1):
        raise DatasetError(f"{where}: corpus too short ({len(text)} characters; need {4 * (block_size + 1)})")
    if len(vocabulary) < 2:     # as a target of one class: it trained to loss 0 and accuracy 1.0 at once, unsaid
        raise DatasetError(f"{where}: the corpus is one character, {vocabulary[0]!r}, repeated: nothing to predict")
    index = {ch: i for i, ch in enumerate(vocabulary)}
    tokens = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    windows = tokens[: (len(tokens) - 1) // block_size * block_size + 1]
    x = windows[:-1].view(-1, block_size)
    y = windows[1:].view(-1, block_size)
    n_eval = eval_rows(len(x))
    # Held-out text is the end of the corpus, not a shuffle, so eval text is unseen.
    return Dataset(name=name, task="language", train=TensorDataset(x[:-n_eval], y[:-n_eval]),
                   eval=TensorDataset(x[-n_eval:], y[-n_eval:]), input_shape=(block_size,),
                   num_outputs=len(vocabulary))
