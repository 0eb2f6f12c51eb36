"""Each node's module and line of user code (attribution.py), held to
truths the attribution does not compute: which parameter an op reads, the
lines of this file, the tensors dynamo passes a backend."""

import inspect
import operator
import os

import pytest
import torch
from torch import nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.nn.modules import module as module_hooks
from torch.utils.checkpoint import checkpoint

import mutwo_backend
from mutwo_backend import CaptureError, capture_train_step
from mutwo_backend.attribution import MODULE_KEY, SOURCE_KEY, dynamo_attribution, dynamo_input_names, dynamo_model_name

aten = torch.ops.aten


class Block(nn.Module):
    """conv-bn-relu twice with a residual add."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


def train_step(model, optimizer, x, y):
    out = mutwo_backend.sep(model(x))
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def line_of(function, text: str) -> int:
    """The line number of the line of ``function``'s source holding ``text``."""
    lines, first = inspect.getsourcelines(function)
    (offset,) = [i for i, line in enumerate(lines) if text in line]
    return first + offset


def source_of(function, text: str) -> tuple[str, int]:
    return inspect.getsourcefile(function), line_of(function, text)


def split_source(source: str) -> tuple[str, int]:
    filename, line = source.rsplit(":", 1)
    return filename, int(line)


def assert_source(source: str | None, function, text: str) -> None:
    assert source is not None
    filename, line = split_source(source)
    expected_file, expected_line = source_of(function, text)
    assert os.path.samefile(filename, expected_file) and line == expected_line, (source, expected_line)


# where each conv of the model is called: the line of user code that issues it
CONV_CALLS = {"stem": (Net.forward, "self.stem("), "conv1": (Block.forward, "self.conv1("),
              "conv2": (Block.forward, "self.conv2(")}


def conv_call(module_path: str):
    return CONV_CALLS[module_path.rsplit(".", 1)[-1]]


@pytest.fixture(scope="module", params=["fused", "foreach"])
def captures(request):
    """The Net's step captured both ways, with fused Adam (rewritten after
    the capture) or foreach Adam (decomposed while capturing)."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), **{request.param: True})
    batch = (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,)))
    steps = {record: capture_train_step(train_step, model, optimizer, *batch, record=record)
             for record in (True, False)}
    assert [steps[True].capture_method, steps[False].capture_method] == ["recorded", "traced"]
    return model, steps


def weight_owner(step, weight: torch.fx.Node) -> str:
    """The module whose weight placeholder ``weight`` is, from the capture's input roles."""
    role = step.placeholder_roles[weight.name]
    assert role.kind == "param" and role.name.endswith(".weight")
    return role.name.removesuffix(".weight")


@pytest.mark.parametrize("record", [True, False])
def test_forward_convolutions_name_the_conv_that_ran_them(captures, record):
    model, steps = captures
    step = steps[record]
    convolutions = [n for n in step.gm.graph.nodes if n.target is aten.convolution.default]
    owners = [weight_owner(step, n.args[1]) for n in convolutions]
    assert sorted(owners) == sorted(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    for node, owner in zip(convolutions, owners):
        assert node.meta[MODULE_KEY] == owner
        assert_source(node.meta[SOURCE_KEY], *conv_call(owner))


@pytest.mark.parametrize("record", [True, False])
def test_backward_convolutions_name_the_forward_conv_of_their_weight(captures, record):
    _, steps = captures
    step = steps[record]
    forward = {n.args[1]: n for n in step.gm.graph.nodes if n.target is aten.convolution.default}
    backward = [n for n in step.gm.graph.nodes if n.target is aten.convolution_backward.default]
    assert len(backward) == len(forward)
    for node in backward:
        twin = forward[node.args[2]]  # (grad_output, input, weight, ...)
        assert (node.meta[MODULE_KEY], node.meta[SOURCE_KEY]) == (twin.meta[MODULE_KEY], twin.meta[SOURCE_KEY])
        assert node.meta[MODULE_KEY] == weight_owner(step, node.args[2])
        getitems = [user for user in node.users if user.target is operator.getitem]
        assert getitems and all(g.meta[MODULE_KEY] == node.meta[MODULE_KEY] for g in getitems)


@pytest.mark.parametrize("record", [True, False])
def test_root_loss_and_optimizer_ops(captures, record):
    """The root's own op names the root class; the loss (forward and
    backward) and the optimizer step are outside the model: no module,
    and train_step's lines."""
    _, steps = captures
    nodes = list(steps[record].gm.graph.nodes)
    by_target = lambda *targets: [n for n in nodes if n.target in targets]  # noqa: E731
    (mean,) = by_target(aten.mean.dim)
    assert mean.meta[MODULE_KEY] == "Net"
    assert_source(mean.meta[SOURCE_KEY], Net.forward, "x.mean(")
    loss = by_target(aten._log_softmax.default, aten.nll_loss_forward.default,
                     aten._log_softmax_backward_data.default, aten.nll_loss_backward.default)
    assert len(loss) == 4
    for node in loss:
        assert node.meta[MODULE_KEY] is None
        assert_source(node.meta[SOURCE_KEY], train_step, "cross_entropy(")
    optimizer = [n for n in nodes if "_fused_adam" in str(n.target) or "foreach_" in str(n.target)]
    assert len(optimizer) > 1
    for node in optimizer:
        assert node.meta[MODULE_KEY] is None
        assert_source(node.meta[SOURCE_KEY], train_step, "optimizer.step()")


@pytest.mark.parametrize("record", [True, False])
def test_every_op_node_is_attributed(captures, record):
    _, steps = captures
    for node in steps[record].gm.graph.nodes:
        if node.op == "call_function":
            assert MODULE_KEY in node.meta and SOURCE_KEY in node.meta, node.name


def test_both_capture_paths_attribute_alike(captures):
    _, steps = captures
    attributions = [{n.name: (n.meta.get(MODULE_KEY), n.meta.get(SOURCE_KEY)) for n in step.gm.graph.nodes}
                    for step in (steps[True], steps[False])]
    assert attributions[0] == attributions[1]


class Checkpointed(nn.Module):
    """A block recomputed in backward (torch.utils.checkpoint)."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def block(self, x):
        return self.down(torch.relu(self.up(x)))

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=False))


@pytest.mark.parametrize("record", [True, False])
def test_a_forward_rerun_in_backward_names_its_modules(record):
    """Checkpointing reruns ``block`` during backward: its ops name the
    Linear they run in, and the module hooks are gone afterwards."""
    model = Checkpointed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks)
    step = capture_train_step(train_step, model, optimizer, torch.randn(4, 16), torch.randint(0, 10, (4,)),
                              record=record)
    assert (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks)) == hooks
    # aten.t of a weight placeholder: the Linear's forward, once more for a rerun
    transposes = [n for n in step.gm.graph.nodes if n.target is aten.t.default and n.args[0].op == "placeholder"]
    owners = [weight_owner(step, n.args[0]) for n in transposes]
    assert sorted(owners) == ["down", "down", "head", "up", "up"]
    for node, owner in zip(transposes, owners):
        assert node.meta[MODULE_KEY] == owner


# --- torch.compile -----------------------------------------------------------

def compile_and_record(fn, *args):
    """Run ``fn(*args).sum().backward()``, ``fn`` compiled with an AOTAutograd backend that
    keeps the dynamo graph's input names and model name (read in the
    backend: dynamo drops the placeholders' sources after compiling), its
    example inputs and the forward and backward graphs."""
    seen = {}

    def backend(gm, example_inputs):
        seen.update(names=dynamo_input_names(gm), model_name=dynamo_model_name(gm), inputs=list(example_inputs))

        def keep(kind):
            def compiler(graph, _):
                seen[kind] = graph
                return make_boxed_func(graph.forward)
            return compiler
        return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))(gm, example_inputs)

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=backend, fullgraph=True)(*args).sum().backward()
    finally:
        torch._dynamo.reset()
    return seen


def square_mean(model):
    def loss(x):
        return model(x).square().mean()
    return loss


@pytest.fixture(scope="module")
def compiled():
    """A function that calls the Net, compiled."""
    torch.manual_seed(0)
    model = Net()
    return model, compile_and_record(square_mean(model), torch.randn(2, 3, 8, 8))


def test_dynamo_input_names_are_the_tensors_dynamo_passes(compiled):
    model, seen = compiled
    names = seen["names"]
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert len(names) == len(seen["inputs"])
    for name, tensor in zip(names, seen["inputs"]):
        if name is None:
            assert all(tensor is not t for t in state.values())
        else:
            assert state[name] is tensor
    assert sorted(n for n in names if n is not None) == sorted(state)


def test_dynamo_attribution_of_forward_and_backward_convolutions(compiled):
    """A conv node's weight is ``primals_<i>``, AOTAutograd's i-th input:
    the parameter dynamo_input_names names (checked above)."""
    model, seen = compiled
    names = seen["names"]
    owner = lambda weight: names[int(weight.name.removeprefix("primals_")) - 1].removesuffix(".weight")  # noqa: E731
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for kind, op, weight_at in (("forward", aten.convolution.default, 1),
                                ("backward", aten.convolution_backward.default, 2)):
        nodes = [n for n in seen[kind].graph.nodes if n.target is op]
        assert {owner(n.args[weight_at]) for n in nodes} == convs
        for node in nodes:
            module, source = dynamo_attribution(node)
            assert module == owner(node.args[weight_at])
            assert_source(source, *conv_call(module))
    assert seen["model_name"] == "Net"  # (the function called the model: its root entry is there)
    (mean,) = [n for n in seen["forward"].graph.nodes if n.target is aten.mean.dim]
    assert dynamo_attribution(mean)[0] == "Net"
    (loss,) = [n for n in seen["forward"].graph.nodes if n.target is aten.mean.default]
    assert dynamo_attribution(loss)[0] is None
    assert_source(dynamo_attribution(loss)[1], square_mean, ".square().mean()")


def test_dynamo_names_of_a_compiled_module():
    """torch.compile(model): dynamo's names start at the module itself (no
    root entry), the paths are the same."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(3), Block(3))
    seen = compile_and_record(model, torch.randn(2, 3, 4, 4))
    names = seen["names"]
    convs = {n for n in seen["forward"].graph.nodes if n.target is aten.convolution.default}
    assert {dynamo_attribution(n)[0] for n in convs} == {"0.conv1", "0.conv2", "1.conv1", "1.conv2"}
    for node in convs:
        assert dynamo_attribution(node)[0] + ".weight" == names[int(node.args[1].name.removeprefix("primals_")) - 1]


@pytest.mark.parametrize("path", ["L['self'].layer1[0].conv1", "L['self']._modules['layer1']._modules['0']._modules['conv1']",
                                  "G['model'].layer1.0.conv1", "layer1.0.conv1"])
def test_dynamo_attribution_reads_the_module_path_formats_of_torch_versions(path):
    """Module stacks as dynamo writes them across torch versions (source
    names, source names with ._modules cleaned away, plain paths), and a
    stack trace whose innermost frame is torch's."""
    node = torch.fx.Graph().call_function(torch.relu, ())
    node.meta["fwd_nn_module_stack"] = {"a": ("L['self']", Net), "b": (path, nn.Conv2d)}
    node.meta["stack_trace"] = ('  File "/home/me/train.py", line 7, in step\n    out = model(x)\n'
                                '  File "/site-packages/torchvision/models/resnet.py", line 92, in forward\n'
                                '    out = self.conv1(x)\n'
                                f'  File "{nn.Conv2d.forward.__code__.co_filename}", line 548, in forward\n'
                                '    return self._conv_forward(input, self.weight, self.bias)\n')
    assert dynamo_attribution(node) == ("layer1.0.conv1", "/site-packages/torchvision/models/resnet.py:92")
    node.meta["fwd_nn_module_stack"] = {"a": ("L['self']", Net)}
    assert dynamo_attribution(node)[0] == "Net"


# --- error messages ----------------------------------------------------------

@pytest.mark.parametrize("value, article", [(3, "not an int"), ({"logits": 1}, "not a dict"), (None, "not None")])
def test_sep_names_what_it_got_with_its_article(value, article):
    with pytest.raises(CaptureError, match=f"output tensor, {article}: pass the tensor"):
        mutwo_backend.sep(value)


def reads_a_value(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
    if loss.item() > 0:
        loss.backward()
    optimizer.step()


def test_reading_a_tensor_value_names_the_line_first():
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks)
    with pytest.raises(CaptureError) as raised:
        capture_train_step(reads_a_value, model, optimizer, torch.randn(2, 4), torch.tensor([0, 2]))
    filename, line = source_of(reads_a_value, "loss.item()")
    assert str(raised.value).startswith(f"{filename}:{line} reads a tensor's value: `if loss.item() > 0:`\n")
    assert "torch.where" in str(raised.value) and "backend='mutwo_profile'" in str(raised.value)
    assert (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks)) == hooks
