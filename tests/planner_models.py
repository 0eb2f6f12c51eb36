"""Models whose activations make the peak, and their train step: the
planner's and the runtime's test cases (test_planner*.py, test_runtime.py,
test_optimizing_backend.py, test_replay.py)."""

import copy

import torch
from torch import nn

import mutwo_backend


class DeepMLP(nn.Module):
    def __init__(self, width=256, depth=8, dropout=0.0):
        super().__init__()
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()] + ([nn.Dropout(dropout)] if dropout else [])
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.blocks(x))


class SmallCNN(nn.Module):
    """Convolutions with BatchNorm, ReLU (in place, as ResNet's) and residual adds."""

    def __init__(self, channels=16, blocks=3, inplace=True):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=inplace))
                                    for _ in range(blocks))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


class NativeDropoutMLP(nn.Module):
    """Linear, GELU and ``native_dropout`` blocks: dropout as a GPU capture
    records it (the CPU's records ``bernoulli_``), here on any device."""

    def __init__(self, width=256, depth=6, p=0.1):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)
        self.p = p

    def forward(self, x):
        for layer in self.layers:
            x = torch.ops.aten.native_dropout.default(nn.functional.gelu(layer(x)), self.p, True)[0]
        return self.head(x)


class TiedLM(nn.Module):
    """An embedding whose weight is also the output layer's."""

    def __init__(self, vocab=64, width=128, depth=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])

    def forward(self, tokens):
        return self.layers(self.embed(tokens)) @ self.embed.weight.t()


def with_eager_twin(build):
    """A model built from seed 0, a copy of it to train eagerly, and a fused
    Adam for each: (model, eager, optimizer, eager_optimizer)."""
    torch.manual_seed(0)
    model = build()
    eager = copy.deepcopy(model)
    return (model, eager, torch.optim.Adam(model.parameters(), fused=True),
            torch.optim.Adam(eager.parameters(), fused=True))


def classify_step(model, optimizer, x, y):
    out = mutwo_backend.sep(model(x))
    loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def token_batch():
    return torch.randint(0, 64, (64, 64)), torch.randint(0, 64, (64, 64))
