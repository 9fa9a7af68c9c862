"""The checks a replayed CPU forward makes on every call, in the extension
(csrc/replay_checks.cpp): the marks its layers' weights are checked against
(folding.HeldSources: each table entry still the object held, each tensor
with its version counter and data address), and the walk over the modules
(module_path.known_modules); each giving the same answer as the Python it
stands in for."""
import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import folding
from resnet_fast.layers import is_frozen_bn
from resnet_fast.models import module_path
from resnet_fast.models.resnet import _FusedBlock
from resnet_fast.testing import randomize_batchnorm_

from conftest import kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")


def _C():
    from resnet_fast import _C

    return _C


def _marked_module():
    conv = nn.Conv2d(3, 5, 3)
    tables, names = [conv._parameters, conv._parameters], ["weight", "bias"]
    held = [conv.weight, conv.bias]
    return conv, _C().source_marks(tables, names, held, held)


def test_unchanged_sources_pass():
    _, marks = _marked_module()
    assert _C().sources_unchanged(marks) is True


def _edit_in_place(conv):
    with torch.no_grad():
        conv.weight.mul_(0.5)


def _assign_data(conv):
    conv.weight.data = torch.randn(5, 3, 3, 3)


def _set_storage(conv):
    with torch.no_grad():
        conv.bias.set_(torch.randn(5))


def _replace_parameter(conv):
    conv.bias = nn.Parameter(torch.randn(5))


def _delete_parameter(conv):
    del conv._parameters["bias"]


@pytest.mark.parametrize("change", [_edit_in_place, _assign_data, _set_storage, _replace_parameter, _delete_parameter])
def test_each_kind_of_change_is_seen(change):
    conv, marks = _marked_module()
    change(conv)
    assert _C().sources_unchanged(marks) is False


def test_a_held_none_entry_is_compared_by_identity():
    conv = nn.Conv2d(3, 5, 1, bias=False)
    marks = _C().source_marks([conv._parameters], ["bias"], [None], [])
    assert _C().sources_unchanged(marks) is True
    conv.bias = nn.Parameter(torch.randn(5))
    assert _C().sources_unchanged(marks) is False


def test_a_view_is_marked_at_its_own_address():
    base = torch.randn(10)
    view = base[3:]
    marks = _C().source_marks([], [], [], [view])
    assert _C().sources_unchanged(marks) is True
    view.set_(base[4:])  # same storage, other offset
    assert _C().sources_unchanged(marks) is False


@pytest.mark.parametrize("args, error, match", [
    (([], [], []), TypeError, "4 arguments"),
    ((1, [], [], []), TypeError, "four sequences"),
    (([{}], [], [], []), ValueError, "one item each"),
    (([[]], ["w"], [None], []), TypeError, "tables must be dicts"),
    (([{}], [3], [None], []), TypeError, "names str"),
    (([], [], [], [3.0]), TypeError, r"tensors\[0\] is not a tensor"),
])
def test_malformed_marks_are_refused(args, error, match):
    with pytest.raises(error, match=match):
        _C().source_marks(*args)


def test_an_inference_tensor_is_refused():
    with torch.inference_mode():
        t = torch.randn(3)
    with pytest.raises(TypeError, match="inference tensor"):
        _C().source_marks([], [], [], [t])


def test_only_marks_are_checked():
    with pytest.raises(TypeError, match="takes what source_marks returned, got object"):
        _C().sources_unchanged(object())


def _held_sources(model, x):
    with torch.no_grad():
        model(x)
        model(x)
    (program,) = model._cpu_replays._programs.values()
    return program.sources


@pytest.mark.parametrize("change", [None, _edit_in_place, _assign_data, _replace_parameter])
def test_held_sources_answer_alike_with_and_without_the_extension(change):
    torch.manual_seed(0)
    model = randomize_batchnorm_(resnet_fast.models.resnet18(num_classes=7)).eval()
    sources = _held_sources(model, torch.randn(1, 3, 32, 32))
    assert sources._marks not in (None, False)
    if change is not None:
        change(model.layer2[1].conv1)
    in_extension = sources.unchanged()
    marks, sources._marks = sources._marks, None  # the Python loops
    try:
        assert sources.unchanged() == in_extension == (change is None)
    finally:
        sources._marks = marks


def test_sources_changed_before_marking_are_never_unchanged():
    torch.manual_seed(0)
    model = randomize_batchnorm_(resnet_fast.models.resnet18(num_classes=7)).eval()
    _held_sources(model, torch.randn(1, 3, 32, 32))
    cache = folding.fold_cache(model.conv1, "folded")
    layer = (cache, cache._entry, model.conv1, model.bn1)
    assert folding.HeldSources([layer]).unchanged() is True
    _edit_in_place(model.conv1)
    # Marked after the edit: the entry's marks, made before it, decide.
    again = folding.HeldSources([layer])
    assert again._marks is False
    assert again.unchanged() is False


# ------------------------------------------------------------- module walk

def _walks(network):
    """(the extension's walk, the Python one) of network's modules."""
    in_extension = module_path.known_modules(network, _FusedBlock)
    known = module_path.native_loaded
    module_path.native_loaded = lambda: False
    try:
        in_python = module_path.known_modules(network, _FusedBlock)
    finally:
        module_path.native_loaded = known
    return in_extension, in_python


def _same(a, b):
    return a is None and b is None or (a is not None and b is not None and len(a) == len(b)
                                       and all(x is y for x, y in zip(a, b)))


@pytest.mark.parametrize("build", [
    lambda: resnet_fast.models.resnet18(num_classes=3),
    lambda: resnet_fast.models.resnet50(),
    lambda: resnet_fast.models.resnext50_32x4d(),
    lambda: resnet_fast.models.resnet34(features_only=True, out_indices=(1, 3)),
    lambda: resnet_fast.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d),
])
def test_the_walk_finds_the_modules_the_python_walk_finds_in_its_order(build):
    network = build()
    in_extension, in_python = _walks(network)
    assert in_extension is not None and len(in_extension) > 20
    assert _same(in_extension, in_python)


def _forward_hook(network):
    network.layer3[1].bn2.register_forward_hook(lambda *args: None)


def _forward_pre_hook(network):
    network.layer1[0].conv1.register_forward_pre_hook(lambda *args: None)


def _backward_hook(network):
    network.layer4[0].downsample[0].register_full_backward_hook(lambda *args: None)


def _backward_pre_hook(network):
    network.layer2.register_full_backward_pre_hook(lambda *args: None)


def _unknown_module(network):
    network.layer2[1].relu = nn.GELU()


def _unknown_child_of_a_known_one(network):
    network.layer1[0].conv1.extra = nn.Tanh()


def _removed_child(network):
    network.layer3[0].downsample = None


@pytest.mark.parametrize("change, walks", [
    (_forward_hook, False), (_forward_pre_hook, False), (_backward_hook, False), (_backward_pre_hook, False),
    (_unknown_module, False), (_unknown_child_of_a_known_one, False), (_removed_child, True),
])
def test_the_walk_refuses_what_the_python_walk_refuses(change, walks):
    network = resnet_fast.models.resnet18()
    change(network)
    in_extension, in_python = _walks(network)
    assert (in_extension is not None) == walks
    assert _same(in_extension, in_python)


def test_the_walk_passes_on_errors_and_refuses_malformed_arguments():
    network = resnet_fast.models.resnet18()

    def fails(module):
        raise RuntimeError("also_known failed")

    network.layer1[0].conv1.extra = nn.Tanh()  # not a known type: also_known is asked
    with pytest.raises(RuntimeError, match="also_known failed"):
        _C().module_walk(network, module_path._KNOWN_MODULES, _FusedBlock, fails)
    with pytest.raises(TypeError):
        _C().module_walk(network, list(module_path._KNOWN_MODULES), _FusedBlock, is_frozen_bn)
    network = resnet_fast.models.resnet18()
    network.layer1[0].conv1._modules = [nn.ReLU()]
    with pytest.raises(TypeError, match=r"Conv2d._modules is a list, not a dict"):
        _C().module_walk(network, module_path._KNOWN_MODULES, _FusedBlock, is_frozen_bn)
