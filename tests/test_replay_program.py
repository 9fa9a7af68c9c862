"""The loop of a replayed CPU forward in the extension
(csrc/replay_program.cpp): it runs whenever the extension is loaded, it
computes exactly what the Python loop it stands in for computes, it lets go
of each intermediate result as that loop does, and it refuses what it cannot
run with an error that names the problem."""
import gc
import weakref

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import cpu_replay
from resnet_fast.testing import randomize_batchnorm_

from conftest import channels_last, kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")


def _C():
    from resnet_fast import _C

    return _C


def _recorded(arch, dtype=torch.float32, batch=2, **kwargs):
    """(model, input, its one recorded program), the model warmed on the input."""
    torch.manual_seed(0)
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10)).eval()
    model = resnet_fast.from_torchvision(tv, **kwargs).eval().to(dtype)
    x = channels_last(torch.randn(batch, 3, 45, 39, dtype=dtype))
    with torch.no_grad():
        for _ in range(2):
            model(x)
    (program,) = model.__dict__["_cpu_replays"]._programs.values()
    return model, x, program


def _both_loops(model, x, program):
    """The model's output with the C++ loop, then with the Python loop."""
    with torch.no_grad():
        native = model(x)
        held, program.native = program.native, None
        try:
            python = model(x)
        finally:
            program.native = held
    return native, python


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loop_in_the_extension_computes_what_the_python_loop_computes(arch, dtype):
    model, x, program = _recorded(arch, dtype)
    assert program.native is not None  # no silent fallback for the models we ship
    native, python = _both_loops(model, x, program)
    assert torch.equal(native, python)
    assert native.dtype == dtype and torch.isfinite(native).all()


def test_several_outputs_come_back_in_order():
    torch.manual_seed(0)
    model = randomize_batchnorm_(resnet_fast.resnet50(features_only=True, out_indices=(1, 2, 4))).eval()
    x = channels_last(torch.randn(2, 3, 64, 48))
    with torch.no_grad():
        for _ in range(2):
            model(x)
    (program,) = model.__dict__["_cpu_replays"]._programs.values()
    assert program.native is not None and len(program.outputs) == 4  # the last map, then the three asked for
    native, python = _both_loops(model, x, program)
    assert len(native) == 3
    for a, b in zip(native, python):
        assert torch.equal(a, b)


def test_a_batch_of_one_and_a_wider_image_replay_alike():
    for batch in (1, 3):
        model, x, program = _recorded("resnet18", batch=batch)
        native, python = _both_loops(model, x, program)
        assert torch.equal(native, python)


def test_a_program_the_extension_refuses_runs_in_python(monkeypatch):
    def refuse(*args):
        raise TypeError("refused")

    monkeypatch.setattr(_C(), "replay_program", refuse)
    model, x, program = _recorded("resnet18")
    assert program.native is None
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)


# Programs written by hand: module calls (how 3) are Python callables.

def _scale(factor):
    return lambda t: t * factor


def _run(calls, size, outputs, x):
    """Make the program and run it on x, passing its callables as cpu_replay does."""
    program = _C().replay_program(calls, size, outputs)
    return _C().replay_run(program, x, tuple(what for how, what, *_ in calls if how in (2, 3)))


def test_intermediate_results_are_let_go_after_their_last_use():
    kept = []

    def first(t):
        out = t + 1
        kept.append(weakref.ref(out))
        return out

    def second(t):
        assert kept[0]() is not None  # still held: this call reads it
        return t * 2

    calls = [(3, first, (), (), 0, None, 1, ()), (3, second, (), (), 1, None, 2, (1,))]
    x = torch.randn(4)
    (out,) = _run(calls, 3, [2], x)
    gc.collect()
    assert kept[0]() is None
    assert torch.equal(out, (x + 1) * 2)


def test_an_operator_call_takes_its_weights_and_flags_as_recorded():
    # conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu), then the same into a residual.
    weight, bias = torch.randn(6, 4, 3, 3), torch.randn(6)
    x = channels_last(torch.randn(2, 4, 9, 7))
    residual = channels_last(torch.randn(2, 6, 9, 7))
    tail = ((1, 1), (1, 1), (1, 1), 1, True)
    calls = [
        (0, ("resnet_fast::conv_bias_act", ""), (weight, bias), tail, 0, None, 1, ()),
        (3, lambda t: residual.clone(), (), (), 0, None, 2, ()),
        (1, ("resnet_fast::conv_bias_act_", ""), (weight, bias), tail, 0, 2, 2, ()),
    ]
    plain, into = _run(calls, 3, [1, 2], x)
    conv = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(plain, torch.relu(conv), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(into, torch.relu(conv + residual), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec, message", [
    ((7, _scale(2), (), (), 0, None, 1, ()), "how must be 0, 1, 2 or 3"),
    ((3, _scale(2), (), (), 0, None, 5, ()), "out must be a slot"),
    ((3, _scale(2), (), (), -1, None, 1, ()), "a must be a slot"),
    ((3, _scale(2), (), (), 0, None, 1, (9,)), "drop must be a slot"),
    ((1, ("resnet_fast::conv_bias_act_", ""), (), (), 0, None, 1, ()), "b must be a slot"),
    ((3, "not callable", (), (), 0, None, 1, ()), "needs a callable"),
    ([3, _scale(2), (), (), 0, None, 1, ()], "each call must be a tuple"),
    ((3, _scale(2), (), (), 0, None, 1), "each call must be a tuple"),
    ((0, "resnet_fast::conv_bias_act", (), (), 0, None, 1, ()), "names its operator as"),
    ((0, ("resnet_fast::conv_bias_act", ""), (), (), 0, None, 1, ()), "takes 9 arguments, got 2"),
    ((0, ("resnet_fast::conv_bias_act", ""), (torch.ones(1), torch.ones(1)),
      ((1, 1), (1, 1), (1, 1), 1, "relu"), 0, None, 1, ()), "argument 'relu' is a str"),
    ((0, ("resnet_fast::conv_bias_act", ""), (torch.ones(1), torch.ones(1)),
      ((1, 1), (1, 1), (1, 1.5), 1, True), 0, None, 1, ()), "argument 'dilation' holds a non-int"),
    ((0, ("resnet_fast::conv_bias_act", ""), (torch.ones(1), torch.ones(1)),
      ((1, 1), (1, 1), (1, 1), True, True), 0, None, 1, ()), "argument 'groups' must be int, got bool"),
])
def test_a_malformed_call_is_refused_when_the_program_is_made(spec, message):
    with pytest.raises(TypeError, match=message):
        _C().replay_program([spec], 2, [1])


def test_an_unknown_operator_is_refused_when_the_program_is_made():
    with pytest.raises(RuntimeError, match="resnet_fast::no_such_op"):
        _C().replay_program([(0, ("resnet_fast::no_such_op", ""), (), (), 0, None, 1, ())], 2, [1])


@pytest.mark.parametrize("size, outputs, message", [(0, [0], "size must be a positive int"),
                                                    (2, [2], "an output must be a slot")])
def test_a_malformed_program_is_refused(size, outputs, message):
    with pytest.raises(TypeError, match=message):
        _C().replay_program([], size, outputs)


def test_run_takes_a_program_and_a_tensor():
    double = _scale(2)
    program = _C().replay_program([(3, double, (), (), 0, None, 1, ())], 2, [1])
    with pytest.raises(TypeError, match="takes what replay_program returned"):
        _C().replay_run(object(), torch.ones(1), (double,))
    with pytest.raises(TypeError, match="takes a tensor, got list"):
        _C().replay_run(program, [1.0], (double,))
    for wrong in ((), (double, double), [double]):
        with pytest.raises(TypeError, match="takes the program's 1 step and module callables as a tuple"):
            _C().replay_run(program, torch.ones(1), wrong)
    assert torch.equal(_C().replay_run(program, torch.ones(1), (double,))[0], torch.full((1,), 2.0))


def test_errors_inside_a_run_come_out_as_raised():
    def fails(t):
        raise KeyError("from a module")

    with pytest.raises(KeyError, match="from a module"):
        _run([(3, fails, (), (), 0, None, 1, ())], 2, [1], torch.ones(1))
    with pytest.raises(TypeError, match="returned something other than a tensor"):
        _run([(3, lambda t: 3, (), (), 0, None, 1, ())], 2, [1], torch.ones(1))

    # An operator's own check: this input has 3 channels where the weight wants 4.
    weight, bias = torch.randn(6, 4, 3, 3), torch.randn(6)
    conv = (0, ("resnet_fast::conv_bias_act", ""), (weight, bias), ((1, 1), (1, 1), (1, 1), 1, False), 0, None, 1, ())
    with pytest.raises(RuntimeError, match="channels"):
        _run([conv], 2, [1], channels_last(torch.randn(1, 3, 5, 5)))


def test_a_program_outlives_the_objects_it_was_made_from():
    model, x, program = _recorded("resnet18")
    with torch.no_grad():
        expected = model.forward_features(x)  # what the recording covers: the stages, not the head
    native = program.native
    del program
    model.__dict__["_cpu_replays"].clear()
    gc.collect()
    (out,) = _C().replay_run(*native[:1], x, native[1])  # it holds its operators' weights itself
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_the_loop_excludes_autograd_as_the_python_loop_does():
    seen = []

    def record(t):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality))
        return t * 2

    _run([(3, record, (), (), 0, None, 1, ())], 2, [1], torch.ones(2))
    assert seen == [True]
    assert not torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality)


def test_cpu_replay_keeps_a_native_program_per_recording():
    model, x, program = _recorded("resnet18")
    assert isinstance(program, cpu_replay._Program) and program.native is not None


def test_a_model_with_a_native_program_is_freed():
    # The program's module calls are bound methods of the model: kept in the
    # extension, they would tie the model to itself where the garbage
    # collector cannot see.
    model, x, program = _recorded("resnet18")
    assert program.native is not None
    watched = weakref.ref(model)
    del model, program
    gc.collect()
    assert watched() is None
