"""The separator ops: identity views with a backward marker, safe to define twice."""

import subprocess
import sys

import torch

import mutwo_backend
from mutwo_backend import separator


def test_sep_is_an_identity_view_with_identity_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    y = mutwo_backend.sep(x)
    assert torch.equal(y, x)
    assert y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    (y * torch.arange(3.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(3.0).expand(4, 3))


def test_ops_work_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 5)
        assert torch.ops.separator.sep(x).shape == (2, 5)
        assert torch.ops.separator.sep_backward(x).shape == (2, 5)


def test_defining_the_library_twice_does_not_fail():
    separator._define_ops()
    assert torch.ops.separator.sep(torch.ones(2)).sum().item() == 2


def test_import_after_another_library_defined_separator():
    script = (
        "import torch\n"
        "lib = torch.library.Library('separator', 'DEF')\n"
        "lib.define('sep(Tensor x) -> Tensor')\n"
        "lib.impl('sep', lambda x: x.clone(), 'CompositeExplicitAutograd')\n"
        "import mutwo_backend\n"
        "x = torch.ones(3, requires_grad=True)\n"
        "mutwo_backend.sep(x).sum().backward()\n"
        "print(x.grad.tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1.0, 1.0, 1.0]"
