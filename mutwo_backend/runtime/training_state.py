"""A copy of everything a training step changes, kept on the host, to put
back when optimize_train_step fails after its profiling trained: a bad
budget must leave the model and the optimizer as they were."""

import contextlib

import torch
from torch import nn


class TrainingState:
    """Parameters, buffers, gradients, optimizer state and the random
    generators, copied to the host when made."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.tensors = {name: t.detach().to("cpu", copy=True)
                        for name, t in (*model.named_parameters(), *model.named_buffers())}
        self.grads = {name: None if p.grad is None else p.grad.detach().to("cpu", copy=True)
                      for name, p in model.named_parameters()}
        self.optimizer_state = {param: {key: _host_copy(value) for key, value in state.items()}
                                for param, state in optimizer.state.items()}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for name, tensor in (*self.model.named_parameters(), *self.model.named_buffers()):
                tensor.copy_(self.tensors[name])
            for name, param in self.model.named_parameters():
                saved = self.grads[name]
                param.grad = None if saved is None else saved.to(param.device)
            for param in list(self.optimizer.state):
                if param not in self.optimizer_state:
                    del self.optimizer.state[param]
            for param, saved in self.optimizer_state.items():
                state = self.optimizer.state[param]
                for key, value in saved.items():
                    if isinstance(value, _HostCopy):
                        state[key] = value.tensor.to(value.device)
                    else:
                        state[key] = value
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


class _HostCopy:
    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.device = tensor.detach().to("cpu", copy=True), tensor.device


def _host_copy(value):
    return _HostCopy(value) if torch.is_tensor(value) else value


@contextlib.contextmanager
def restored_on(errors, model: nn.Module, optimizer: torch.optim.Optimizer):
    """Put the training state back if one of ``errors`` is raised inside."""
    saved = TrainingState(model, optimizer)
    try:
        yield
    except errors:
        saved.restore()
        raise
