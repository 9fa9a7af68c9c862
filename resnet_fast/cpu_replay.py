"""A ResNet's CPU inference forward, recorded once per kind of input and
replayed.

An eval forward on the CPU without gradients, through a network whose
modules are all known and hook-free (models.module_path.known_modules),
decides the same things at every layer on every call with the same input:
each layer's FoldCache keeps its decided step (cpu_inference.CpuStep). What
remains per layer is Python: finding the modules, asking the plan, the
backend, the cache, building the step's signature. On a 2-core CPU that
measured some 40 us a layer, a tenth of a ResNet-18's batch-1 forward in
bfloat16. So the forward's stages are recorded once as a flat program (which
step or module reads which earlier result, and when a result is no longer
needed), and a later call with the same kind of input replays it, after
checking what could have changed a decision: the same module objects
throughout the network, the blocks' backends, every norm still in eval
mode, and every layer's fold cache still holding the weights its step was
made from. Anything the recording cannot follow (a layer deciding afresh, a
module outside the known ones, a tensor made between the recorded calls)
leaves the call unrecorded, and it simply runs as it always does.
"""
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import plans
from .backends import native_loaded
from .cpu_memory import reused_activation_memory
from .folding import EmptyWhenCopied, HeldSources

_local = threading.local()


class _Recorder:
    """What one forward did, as calls on numbered results ("slots"; slot 0
    is the input). Results are known by identity, through weak references:
    the recording keeps no activation alive."""

    def __init__(self, x: Tensor):
        self.slots = {id(x): (weakref.ref(x), 0)}
        self.count = 1
        self.calls: List[Tuple[Any, int, Optional[int], int]] = []  # (CpuStep or module, x, residual, result)
        self.checks: List[tuple] = []
        self.layers = 0  # fused layers begun (layer_begins), each to be a recorded step
        self.broken = False

    def slot(self, t: Tensor) -> int:
        found = self.slots.get(id(t))
        if found is None or found[0]() is not t:
            self.broken = True  # made by something the recording did not see
            return -1
        return found[1]

    def result(self, t: Tensor) -> int:
        found = self.slots.get(id(t))
        if found is not None and found[0]() is t:
            return found[1]  # written in place (into the residual), or returned as it was
        self.slots[id(t)] = (weakref.ref(t), self.count)
        self.count += 1
        return self.count - 1

    def add(self, call: Any, x: Tensor, residual: Optional[Tensor], out: Tensor) -> None:
        inputs = (self.slot(x), None if residual is None else self.slot(residual))
        self.calls.append((call, inputs[0], inputs[1], self.result(out)))


def layer_begins() -> None:
    """A fused layer (layers.conv_norm_act) begins: unless it ends in
    note_step, the recording misses it. (A layer that writes into its
    residual returns a result the recording knows, so only this count
    reveals one computed some other way.)"""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.layers += 1


def unrecordable() -> None:
    """Something the recording cannot follow ran (a module fallback, a
    custom shortcut): nothing of this forward is kept."""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.broken = True


def note_step(step, cache, entry, conv: nn.Module, norm: nn.Module, x: Tensor, residual: Optional[Tensor],
              out: Tensor) -> None:
    """cpu_inference ran the step that cache's entry kept: record it, with
    what its validity rests on."""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.add(step, x, residual, out)
        recorder.checks.append((cache, entry, conv, norm))


def call(module: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """module(x), recorded (as one call, whatever it runs inside) when a
    recording is on."""
    recorder = getattr(_local, "recorder", None)
    if recorder is None:
        return module(x)
    _local.recorder = None  # what module runs is replayed by calling it again
    try:
        out = module(x)
    finally:
        _local.recorder = recorder
    recorder.add(module, x, None, out)
    return out


# How a program calls what was recorded: a step's compiled operator for a
# result, or writing into the residual; a step that calls the checked op
# (CpuStep.run_trusted); a module.
_OPERATOR, _OPERATOR_INTO_RESIDUAL, _STEP, _MODULE = range(4)


def _program_call(call: Any) -> Tuple[int, Callable, tuple, tuple]:
    """(how, what to call, weights, trailing arguments) for a recorded call."""
    operator = getattr(call, "compiled_operator", None)
    if operator is None:  # a module
        return _MODULE, call, (), ()
    operator = operator()
    if operator is None:
        return _STEP, call.run_trusted, (), ()
    return (_OPERATOR_INTO_RESIDUAL if call.into_residual else _OPERATOR), operator, call.weights, call.tail


class _Program:
    """A recorded forward: calls (how, what to call, weights, trailing
    arguments, input slot, residual slot, result slot, slots to drop after
    it), the slots returned, and what it was recorded on."""

    __slots__ = ("calls", "outputs", "modules", "blocks", "backends", "norms", "sources", "size", "native")

    def __init__(self, recorder: _Recorder, outputs: Sequence[int], modules: List[nn.Module],
                 blocks: List[nn.Module]):
        last_use = {}
        for i, (_, a, b, out) in enumerate(recorder.calls):
            for s in (a, b, out):
                if s is not None:
                    last_use[s] = i
        drop = [[] for _ in recorder.calls]
        for s, i in last_use.items():
            if s not in outputs:
                drop[i].append(s)  # what a plain forward would have let go of by then
        self.calls = tuple(_program_call(call) + (a, b, out, tuple(d))
                           for (call, a, b, out), d in zip(recorder.calls, drop))
        self.outputs, self.size = tuple(outputs), recorder.count
        self.modules, self.blocks = modules, blocks
        self.backends = [block.backend for block in blocks]
        # BatchNorm in training mode uses batch statistics; a frozen norm's flag changes nothing.
        self.norms = tuple(norm for *_, norm in recorder.checks
                           if isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)))
        self.sources = HeldSources(recorder.checks)
        self.native = _native_program(recorder.calls, self.calls, self.outputs, self.size)

    def still_valid(self, modules: List[nn.Module]) -> bool:
        if modules != self.modules:  # by identity: nn.Module has no __eq__
            return False
        if [block.backend for block in self.blocks] != self.backends:
            return False
        if any(norm.training for norm in self.norms):
            return False
        return self.sources.unchanged()

    def run(self, x: Tensor) -> List[Tensor]:
        # The loop below, in the extension where it made the program (_native_program).
        if self.native is not None:
            from . import _C

            program, callables = self.native
            return _C.replay_run(program, x, callables)
        values: List[Optional[Tensor]] = [None] * self.size
        values[0] = x
        # No input needs a gradient (replayable): one guard for the whole
        # forward instead of one per layer (CpuStep.run_trusted).
        with torch._C._AutoDispatchBelowAutograd():
            for how, run, weights, tail, a, b, out, drop in self.calls:
                if how == _OPERATOR:
                    values[out] = run(values[a], *weights, None if b is None else values[b], *tail)
                elif how == _OPERATOR_INTO_RESIDUAL:
                    run(values[b], values[a], *weights, *tail)
                    values[out] = values[b]
                elif how == _STEP:
                    values[out] = run(values[a], None if b is None else values[b])
                else:
                    values[out] = run(values[a])
                for s in drop:
                    values[s] = None
        return [values[s] for s in self.outputs]


def _native_program(recorded: Sequence[tuple], calls: Sequence[tuple], outputs: Sequence[int],
                    size: int) -> Optional[Tuple[Any, tuple]]:
    """(the program for the C++ loop (csrc/replay_program.cpp), which runs
    the same calls without converting each operator's weights and flags
    again on every call; the Python callables it calls, kept here where the
    garbage collector sees them); None without the extension, or where it
    refuses an argument (the Python loop then runs the calls)."""
    if not native_loaded():
        return None
    from . import _C

    spec = []
    for (step, *_), (how, run, weights, tail, a, b, out, drop) in zip(recorded, calls):
        what = step.operator_name() if how in (_OPERATOR, _OPERATOR_INTO_RESIDUAL) else run
        spec.append((how, what, weights, tail, a, b, out, drop))
    try:
        program = _C.replay_program(spec, size, outputs)
    except (TypeError, RuntimeError):  # an argument of a kind it does not convert, an operator it does not find
        return None
    return program, tuple(run for how, run, *_ in calls if how in (_STEP, _MODULE))


class ReplayCache(EmptyWhenCopied):
    """The recorded programs of one network, per kind of input, the most
    recent MAX_PROGRAMS of them. Copies and pickles start empty."""

    MAX_PROGRAMS = 4

    def __init__(self):
        self._programs: "OrderedDict[tuple, _Program]" = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._programs.clear()

    def get(self, key: tuple) -> Optional[_Program]:
        return self._programs.get(key)

    def put(self, key: tuple, program: _Program) -> None:
        with self._lock:
            self._programs[key] = program
            self._programs.move_to_end(key)
            while len(self._programs) > self.MAX_PROGRAMS:
                self._programs.popitem(last=False)


def _key(x: Tensor, selection: tuple) -> tuple:
    """What the decisions of a recorded forward rest on besides the modules:
    the input's dtype, shape and layout, which outputs are wanted, the thread
    count and the settings the layers read."""
    return (x.dtype, x.shape, x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last), selection,
            torch.get_num_threads(), os.environ.get("RESNET_FAST_CPU_WINOGRAD"),
            os.environ.get("RESNET_FAST_CPU_HALF_IN_FLOAT32"), plans.state())


def replayable(x: Tensor) -> bool:
    """Whether a forward on x may be recorded or replayed: a plain CPU tensor,
    no gradient recording, no CPU autocast, not inside torch.compile, and no
    plan recording (resnet_fast.tune) going on."""
    return (
        type(x) is Tensor and x.device.type == "cpu" and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
        and not plans.recording_active()
    )


def forward(network: nn.Module, x: Tensor, selection: tuple, modules: List[nn.Module], block_types: tuple,
            run: Callable[[], Tuple[Tensor, List[Tensor]]]) -> Tuple[Tensor, List[Tensor]]:
    """run() (a forward returning (output, [features])) for network's input
    x, replayed from its recording for x's kind of input where one is kept
    and still valid, recorded where none is. selection: which outputs run
    returns; modules: the modules below network (known_modules);
    block_types: the block classes whose forward the recording follows
    (exactly: a subclass may compute more than its layers, which a
    recording of the layers would miss)."""
    if not replayable(x) or getattr(_local, "recorder", None) is not None:
        return run()
    with reused_activation_memory():  # the activations' pages, kept from the previous call
        return _replayed_or_recorded(network, x, selection, modules, block_types, run)


def _replayed_or_recorded(network: nn.Module, x: Tensor, selection: tuple, modules: List[nn.Module],
                          block_types: tuple, run: Callable[[], Tuple[Tensor, List[Tensor]]]
                          ) -> Tuple[Tensor, List[Tensor]]:
    cache = network.__dict__.get("_cpu_replays")
    if cache is None:
        cache = network.__dict__.setdefault("_cpu_replays", ReplayCache())
    key = _key(x, selection)
    program = cache.get(key)
    if program is not None:
        if program.still_valid(modules):
            out, *features = program.run(x)
            return out, features
        # What changed one program (weights, modes, modules) most likely
        # changed the others too: drop them all rather than keep their
        # weights alive.
        cache.clear()
    recorder = _local.recorder = _Recorder(x)
    try:
        out, features = run()
    finally:
        _local.recorder = None
    outputs = [recorder.slot(t) for t in [out] + list(features)]
    # The network and its blocks name the backend their layers use.
    blocks = [m for m in [network] + modules if hasattr(type(m), "backend")]
    if (not recorder.broken and recorder.layers == len(recorder.checks)
            and all(type(m) in block_types for m in blocks[1:])):
        cache.put(key, _Program(recorder, outputs, modules, blocks))
    return out, features
