"""The model zoo used by the CLI, the tests and the benchmarks.

Every model is built from its configuration with random weights: nothing is
downloaded, ever. Each entry knows how to make an example batch and how to
compute its loss, so one generic train step serves them all."""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import MutwoError
from .separator import sep


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model, its example batch and its loss."""

    name: str
    build: Callable[[], nn.Module]
    # (batch_size, seq_len, device) -> (inputs, targets)
    make_batch: Callable[[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]]
    # (model, inputs) -> output tensor that the loss reads
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    default_seq_len: int = 0


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, spec: ModelSpec,
               inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One training iteration for a zoo model, with the forward pass marked by
    sep. No local variable holds the model output: eager PyTorch would keep it
    alive through backward, which the graph does not."""
    loss = spec.loss(sep(spec.forward(model, inputs)), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def zoo_train_step(spec: ModelSpec) -> Callable:
    """``train_step(model, optimizer, inputs, targets)`` bound to ``spec``."""
    return lambda model, optimizer, inputs, targets: train_step(model, optimizer, spec, inputs, targets)


def fresh_setup(name: str, batch: int, device: torch.device, seed: int = 0, lr: float = 1e-4):
    """(spec, model, fused Adam, inputs, targets) of a zoo model built from
    ``seed`` on ``device``: the same start for every tool a benchmark runs."""
    spec = get_model(name)
    torch.manual_seed(seed)
    model = spec.build().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    inputs, targets = spec.make_batch(batch, spec.default_seq_len, device)
    return spec, model, optimizer, inputs, targets


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise MutwoError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


class MLP(nn.Module):
    """Three linear layers with ReLU and dropout: small enough to reason about by hand."""

    def __init__(self, in_features: int = 32, hidden: int = 64, classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.dropout(F.relu(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _resnet(depth: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision
        return getattr(torchvision.models, depth)(weights=None)
    return build


def _image_batch(size: int) -> Callable:
    def make_batch(batch_size, seq_len, device):
        inputs = torch.randn(batch_size, 3, size, size, device=device)
        return inputs, torch.randint(0, 1000, (batch_size,), device=device)
    return make_batch


def _bert(**config) -> Callable[[], nn.Module]:
    def build():
        from transformers import BertConfig, BertForMaskedLM
        return BertForMaskedLM(BertConfig(**config))
    return build


def _bert_batch(vocab_size: int) -> Callable:
    def make_batch(batch_size, seq_len, device):
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
        return tokens, torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
    return make_batch


def _mlm_loss(logits, labels):
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


BERT_VOCAB = 30522  # BertConfig's default
MODELS = {spec.name: spec for spec in [
    ModelSpec("resnet152", _resnet("resnet152"), _image_batch(224), lambda m, x: m(x), F.cross_entropy),
    ModelSpec("resnet18", _resnet("resnet18"), _image_batch(64), lambda m, x: m(x), F.cross_entropy),
    ModelSpec("bert", _bert(), _bert_batch(BERT_VOCAB), lambda m, x: m(input_ids=x).logits,
              _mlm_loss, default_seq_len=512),
    ModelSpec("bert-tiny", _bert(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                 intermediate_size=512), _bert_batch(BERT_VOCAB),
              lambda m, x: m(input_ids=x).logits, _mlm_loss, default_seq_len=64),
    ModelSpec("mlp", MLP, lambda b, s, d: (torch.randn(b, 32, device=d), torch.randint(0, 10, (b,), device=d)),
              lambda m, x: m(x), F.cross_entropy),
]}
