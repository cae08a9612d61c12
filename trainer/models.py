"""Built-in models, each knowing its training FLOPs per sample (for MFU).

Training FLOPs ≈ 6 × multiply-accumulates of one forward pass (2 FLOPs per MAC, backward ≈ 2× forward).
"""

import re

import torch
from torch import nn

from trainmetrics.contract import MODELS
from trainmetrics.trainer.data import Dataset


class ModelError(ValueError):
    """A model that cannot be built for the chosen dataset."""


class MLP(nn.Module):
    """A two-hidden-layer perceptron for tabular data (or flattened images).

    It standardises each input feature, and a regression target, by the training split's mean and standard
    deviation (fit_scales), held as buffers so that model.pt answers raw inputs in the target's own units. Raw, a
    feature in the millions saturated every unit and nothing was learnt (accuracy at chance), and a target of
    1e5 stayed out of reach of an output that starts near 0 and moves ~lr a step (its loss did not fall)."""

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        self.register_buffer("output_mean", torch.zeros(num_outputs))
        self.register_buffer("output_std", torch.ones(num_outputs))
        self.wide_inputs = False        # fit_scales

    def fit_scales(self, dataset: Dataset) -> None:
        """Standardise by the training split (never the held-out one): its inputs, and its targets for regression."""
        inputs, targets = dataset.train.tensors
        self.input_mean, self.input_std = _moments(inputs)
        # x - mean overflows float32 only where |x| + |mean| passes its largest value (a column of -3e38 and 3e38,
        # each finite and accepted: every loss was NaN from the first step). Only such data pays for _standardised's
        # guard; a model loaded from model.pt without fit_scales takes the plain form.
        largest = max(max(-float(split.tensors[0].amin()), float(split.tensors[0].amax()))     # (abs() copies it)
                      for split in (dataset.train, dataset.eval) if len(split))
        self.wide_inputs = largest + float(self.input_mean.abs().max()) > torch.finfo(torch.float32).max
        if dataset.task == "regression":
            self.output_mean, self.output_std = _moments(targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._standardised(x.flatten(1))) * self.output_std + self.output_mean

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std; for wide inputs (fit_scales), taken at half scale where x - mean overflowed. Only there:
        halving is not exact below float32's smallest normal number (a column of 0 and 2.8e-45, its std 1.4e-45
        halved to 0, divided by 0 at half scale everywhere)."""
        difference = x - self.input_mean
        if not self.wide_inputs:
            return difference / self.input_std
        halves = (x * 0.5 - self.input_mean * 0.5) / (self.input_std * 0.5)
        return torch.where(difference.isinf(), halves, difference / self.input_std)

    def flops_per_sample(self) -> float:
        """Training FLOPs for one sample."""
        return 6.0 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))


class SmallCNN(nn.Module):
    """Two 3×3 convolutions, a pooling layer and a classifier head, for small images."""

    def __init__(self, input_shape: tuple[int, int, int], num_outputs: int):
        super().__init__()
        channels, height, width = input_shape
        self.input_shape = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (height // 2) * (width // 2), 64), nn.ReLU(),
                                  nn.Linear(64, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def flops_per_sample(self) -> float:
        """Training FLOPs for one sample (convolutions at full resolution, then the head)."""
        _, height, width = self.input_shape
        macs = sum(m.weight.numel() * height * width for m in self.features if isinstance(m, nn.Conv2d))
        macs += sum(m.weight.numel() for m in self.head if isinstance(m, nn.Linear))
        return 6.0 * macs


class CharTransformer(nn.Module):
    """A tiny decoder-only transformer language model over characters."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.block_size, self.d_model, self.layers = block_size, d_model, layers
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(block_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(block_size),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        h = self.token(tokens) + self.position(positions)
        h = self.blocks(h, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(self.norm(h))

    def flops_per_sample(self) -> float:
        """Training FLOPs for one sequence: weight matmuls plus attention scores and mixing."""
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul_params += sum(m.in_proj_weight.numel() for m in self.modules()
                             if isinstance(m, nn.MultiheadAttention))
        attention = 2 * self.layers * self.block_size * self.d_model
        return 6.0 * self.block_size * (matmul_params + attention)


def build_model(name: str, dataset: Dataset) -> nn.Module:
    """The named model shaped for the dataset; ModelError when they do not fit together."""
    if name not in MODELS:
        raise ModelError(f"--model {name}: unknown; choose one of {', '.join(MODELS)}")
    if name == "transformer":
        if dataset.task != "language":
            raise ModelError(f"--model transformer: needs a text dataset (corpus or .txt), not {dataset.name!r}")
        return CharTransformer(dataset.num_outputs, dataset.input_shape[0])
    if dataset.task == "language":
        raise ModelError(f"--model {name}: dataset {dataset.name!r} is text: use --model transformer")
    if name == "cnn":
        if not dataset.is_image:
            raise ModelError(f"--model cnn: needs images shaped (channels, height, width); "
                             f"{dataset.name!r} samples have shape {dataset.input_shape}")
        if min(dataset.input_shape[1:]) < 2:     # its 2x2 pooling leaves nothing (it failed after the job started)
            raise ModelError(f"--model cnn: needs images at least 2 pixels high and wide; {dataset.name!r} samples "
                             f"have shape {dataset.input_shape}")
        return SmallCNN(dataset.input_shape, dataset.num_outputs)
    in_features = 1
    for size in dataset.input_shape:
        in_features *= size
    model = MLP(in_features, dataset.num_outputs)
    model.fit_scales(dataset)
    return model


def _moments(values: torch.Tensor, rows: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's mean and standard deviation (1 for a constant column), over samples flattened to rows: summed
    in float64, a slice of rows at a time (a float64 copy of a large file would double its memory), the deviations
    in a second pass (a column of timestamps, ~1.7e9 give or take 100, lost its spread to sum-of-squares rounding)."""
    flat = values.reshape(len(values), -1)
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    for start in range(0, len(flat), rows):
        total += flat[start:start + rows].sum(dim=0, dtype=torch.float64)
    mean = total / len(flat)
    squares = torch.zeros_like(mean)
    for start in range(0, len(flat), rows):
        squares += ((flat[start:start + rows].double() - mean) ** 2).sum(dim=0)
    std = (squares / len(flat)).sqrt().float()
    std[std == 0] = 1.0     # a constant feature: 0 after its mean is taken off, not 0/0
    return mean.float(), std


# Dense FP32 (non-tensor-core) peak FLOP/s by GPU name; the default training dtype is FP32.
GPU_PEAK_FLOPS_FP32 = {
    "GH200": 67e12,
    "H200 NVL": 60e12,
    "H200": 67e12,
    "H100 NVL": 60e12,
    "H100 PCIe": 51e12,
    "H100": 67e12,
    "A100": 19.5e12,
    "L40S": 91.6e12,
    "L40": 90.5e12,
    "A10G": 31.2e12,
    "L4": 30.3e12,
    "V100S": 16.4e12,
    "V100-PCIE": 14e12,     # torch's "Tesla V100-PCIE-16GB"; "V100" is the SXM2 module's
    "V100": 15.7e12,
    "T4": 8.1e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak FP32 FLOP/s of a known CUDA device, else None (CPU peaks vary too much to guess)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if re.search(r"(?<![0-9A-Za-z])MIG(?![0-9A-Za-z])", name):
        # A MIG slice ("NVIDIA A100-SXM4-40GB MIG 1g.5gb") has a share of its GPU's SMs (a 1g slice 14 of an A100's
        # 108): the whole GPU's peak put its MFU ~7x too low.
        return None
    for key, peak in GPU_PEAK_FLOPS_FP32.items():   # most specific names first
        # A whole name in torch's ("NVIDIA L40", "Tesla V100-SXM2-16GB"): as a substring an L40 was an "L4" (a
        # third of its peak) and a T400 a "T4".
        if re.search(rf"(?<![0-9A-Za-z]){key}(?![0-9A-Za-z])", name):
            return peak
    return None
