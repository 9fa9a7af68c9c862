"""The BatchNorm-folded weights of each conv + eval-BN pair, cached across
forwards (FoldCache): folded once, prepacked for oneDNN per input shape,
transformed for the Winograd convolution or laid out for the Triton GEMM,
and kept with the CPU inference steps decided for them
(resnet_fast.cpu_inference); dropped when a source tensor changes."""
import itertools
import operator
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .backends import native_loaded

def _cacheable(sources) -> bool:
    """Whether a fold of these tensors may be cached: not while torch.compile
    traces (the compiled graph folds by itself), nor while autograd needs to
    flow into them (fine-tuning with frozen BN), nor for tensors made under
    torch.inference_mode, which have no version counter to reveal an
    in-place change (those are folded on every call)."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in sources if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if any(t.is_inference() for t in present):
        _note_uncached_inference_tensors()
        return False
    return True


_inference_note = threading.Event()


def _note_uncached_inference_tensors() -> None:
    if _inference_note.is_set():
        return
    _inference_note.set()
    warnings.warn(
        "resnet_fast: this model's weights were made under torch.inference_mode(), and such tensors have no "
        "version counter to show when they change, so the BatchNorm-folded weights are computed again on every "
        "call instead of cached (slower, same results). Create or load the model outside inference_mode to "
        "cache them; running it inside inference_mode is fine. (Said once.)",
        UserWarning,
        stacklevel=5,
    )


def _fold_key(sources: Tuple[Optional[Tensor], ...], eps: float, dtype: torch.dtype) -> tuple:
    """Each source's storage address, version counter, dtype, device and
    shape (one expression: this runs for every layer on every call)."""
    return tuple([None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape)
                  for t in sources]) + (eps, dtype)


_FOLD_SOURCES = (("weight", "bias"), ("weight", "bias", "running_mean", "running_var"))


def _fold_sources(conv: nn.Module, norm: nn.Module) -> Tuple[Optional[Tensor], ...]:
    """conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
    norm.running_var, read from the modules' parameter and buffer tables
    (what nn.Module's attribute lookup does, minus its cost: this runs for
    every layer on every call), with getattr for anything kept elsewhere."""
    found = []
    for module, names in zip((conv, norm), _FOLD_SOURCES):
        table = module.__dict__
        parameters, buffers = table["_parameters"], table["_buffers"]
        for name in names:
            if name in parameters:
                found.append(parameters[name])
            elif name in buffers:
                found.append(buffers[name])
            else:
                found.append(getattr(module, name))
    return tuple(found)


class EmptyWhenCopied:
    """A cache that copies and pickles of its model start without: pickled
    as nothing, made afresh (its __init__) when unpickled or deep-copied."""

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class FoldCache(EmptyWhenCopied):
    """Folded (weight, bias) of one conv + eval-BN pair, reused across forwards,
    the weight prepacked for oneDNN per input shape (CPU inference), the
    weight transformed for the Winograd convolution (CPU inference,
    ops.winograd_weight), and the weight in the Triton convolution's GEMM
    layout (ops.gemm_layout_weight).

    The key holds the storage address, version counter, dtype and device of
    every source tensor, so an optimizer step, an in-place edit,
    load_state_dict or .to() all invalidate it. Edits through `.data` do not
    bump the version counter: clear_fold_caches() after those. When nothing
    is cached, see _cacheable.

    A prepacked weight is fast only for the input shape it was packed for
    (oneDNN reorders it on every call otherwise, measured up to 4x slower than
    no packing), so one is kept per input shape, the most recent
    MAX_PACKED_SHAPES of them.

    It also keeps the CPU inference steps (cpu_inference.CpuStep) decided
    for these weights, one per kind of input (a signature), the most recent
    MAX_STEPS of them: a later call with the same signature runs its step
    after checking only that the sources are unchanged (for which the entry
    holds the source tensors themselves until it is replaced).
    """

    MAX_PACKED_SHAPES = 4
    MAX_STEPS = 4

    def __init__(self):
        # (source key, (weight, bias), {input shape: packed weight},
        # {"gemm": weight in GEMM layout, "winograd": transformed weight
        # or None, "steps": {signature: CPU inference step}, "sources":
        # (the source tensors, their versions and addresses, eps) for the
        # steps' check}): replaced as a whole when the sources change, so
        # that a reader without the lock sees one consistent entry.
        self._entry: Optional[Tuple[tuple, Tuple[Tensor, Tensor], "OrderedDict[Tuple[int, ...], Tensor]",
                                    Dict[str, Any]]] = None
        self._lock = threading.Lock()

    @property
    def _packed(self) -> "OrderedDict[Tuple[int, ...], Tensor]":
        entry = self._entry
        return OrderedDict() if entry is None else entry[2]

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    def folded(self, conv: nn.Conv2d, norm: nn.Module, prepack_for: Optional[Tensor] = None,
               gemm_layout: bool = False, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """(weight, bias) folded, in dtype (default: the conv weight's); with
        prepack_for (an input), the weight comes prepacked for inputs of its
        shape, where prepacking applies; with gemm_layout, in the Triton
        convolution's operand layout."""
        sources = _fold_sources(conv, norm)
        dtype = sources[0].dtype if dtype is None else dtype
        if not _cacheable(sources):
            return fold_conv_norm(conv, norm, dtype)
        key = _fold_key(sources, norm.eps, dtype)
        shape = None if prepack_for is None else tuple(prepack_for.shape)
        # The common case of a forward, without the lock: one read of the entry.
        entry = self._entry
        if entry is not None and entry[0] == key:
            if gemm_layout and "gemm" in entry[3]:
                return entry[3]["gemm"], entry[1][1]
            if shape is None and not gemm_layout:
                return entry[1]
            packed = entry[2].get(shape)
            if packed is not None:
                try:
                    entry[2].move_to_end(shape)  # most recently used, kept longest
                except KeyError:  # another thread's shape just pushed it out: fine, it is in hand
                    pass
                return packed, entry[1][1]
        # Made as ordinary tensors without autograd history whatever the mode
        # of the call that fills the cache, so that a later call in any mode
        # (inference_mode, no_grad, autograd through the input) can use them.
        with self._lock, torch.inference_mode(False), torch.no_grad():
            entry = self._entry
            if entry is None or entry[0] != key:
                entry = self._entry = (key, fold_conv_norm(conv, norm, dtype), OrderedDict(), {})
            weight, bias = entry[1]
            if gemm_layout:
                if "gemm" not in entry[3]:
                    entry[3]["gemm"] = ops.gemm_layout_weight(weight)
                return entry[3]["gemm"], bias
            if shape is None:
                return weight, bias
            return self._packed_for(entry[2], conv, weight, shape), bias

    def winograd(self, conv: nn.Conv2d, norm: nn.Module) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """(weight, weight_winograd, bias): folded in float32, with the weight
        also transformed for ops.conv3x3_winograd_bias_act. None where that
        does not apply (a weight with NaN or Inf) or nothing is cached."""
        weight, bias = self.folded(conv, norm, dtype=torch.float32)
        entry = self._entry
        if entry is None or entry[1][0] is not weight:  # not cacheable, or replaced meanwhile
            return None
        if "winograd" not in entry[3]:
            with self._lock, torch.inference_mode(False), torch.no_grad():
                if "winograd" not in entry[3]:
                    entry[3]["winograd"] = ops.winograd_weight(weight)
        weight_winograd = entry[3]["winograd"]
        return None if weight_winograd is None else (weight, weight_winograd, bias)

    def step(self, conv: nn.Conv2d, norm: nn.Module, signature: tuple) -> Tuple[Optional[Callable], Any]:
        """(the step kept for signature by keep_step, the entry it belongs
        to), if the sources are still the ones it was made from; else
        (None, None)."""
        entry = self._entry
        if entry is None:
            return None, None
        step = entry[3].get("steps", {}).get(signature)
        if step is None or not _sources_unchanged(entry, conv, norm):
            return None, None
        return step, entry

    def holds(self, entry: Any, conv: nn.Conv2d, norm: nn.Module) -> bool:
        """Whether entry (as step returned it) is still this cache's, made
        from conv's and norm's tensors as they are now."""
        return self._entry is entry and _sources_unchanged(entry, conv, norm)

    def keep_step(self, conv: nn.Conv2d, norm: nn.Module, signature: tuple, dtype: torch.dtype,
                  step: Callable) -> None:
        """Keep step, made from this cache's weights folded in dtype, for
        later calls with signature; nothing is kept when those weights are
        not cached (_cacheable) or the sources changed since."""
        sources = _fold_sources(conv, norm)
        if not _cacheable(sources):
            return
        key = _fold_key(sources, norm.eps, dtype)
        with self._lock:
            entry = self._entry
            if entry is None or entry[0] != key:
                return
            # The sources as the key describes them, for step's check (the
            # latest objects: a parameter replaced by one on the same storage keeps the key).
            entry[3]["sources"] = (sources, tuple(None if t is None else (t._version, t.data_ptr())
                                                  for t in sources), norm.eps)
            steps = entry[3].setdefault("steps", OrderedDict())
            steps[signature] = step
            steps.move_to_end(signature)
            if len(steps) > self.MAX_STEPS:
                steps.popitem(last=False)

    def _packed_for(self, packs: "OrderedDict[Tuple[int, ...], Tensor]", conv: nn.Conv2d, weight: Tensor,
                    shape: Tuple[int, ...]) -> Tensor:
        packed = packs.get(shape)
        if packed is not None:
            packs.move_to_end(shape)
            return packed
        packed = ops.prepack_conv_weight(weight, conv.stride, conv.padding, conv.dilation, conv.groups, shape)
        if packed is None:  # prepacking does not apply (dtype, no oneDNN)
            return weight
        packs[shape] = packed
        if len(packs) > self.MAX_PACKED_SHAPES:
            packs.popitem(last=False)
        return packed


def _sources_unchanged(entry: tuple, conv: nn.Module, norm: nn.Module) -> bool:
    """The key's check, quicker (it runs for every layer on every call): the
    same tensor objects, which the entry holds, with the same version
    counters and storage addresses (`.data =` changes only the latter)."""
    held, marks, eps = entry[3]["sources"]
    if norm.eps != eps:
        return False
    for t, kept, mark in zip(_fold_sources(conv, norm), held, marks):
        if t is not kept or (mark is not None and (t._version != mark[0] or t.data_ptr() != mark[1])):
            return False
    return True


class HeldSources:
    """FoldCache.holds(entry, conv, norm) for many layers at once (a
    replayed forward checks every layer's entry on every call, cpu_replay):
    each cache still on its entry, each norm's eps, each source still the
    tensor its module's parameter or buffer table holds, with the version
    counter and storage address it had. As a few loops that run in C (map)
    over flat lists of all the layers' sources, those of the sources in the
    extension where it is loaded (csrc/replay_checks.cpp). A layer whose
    source is found some other way (getattr) is checked by holds() itself."""

    __slots__ = ("_caches", "_entries", "_norms", "_eps", "_tables", "_names", "_held", "_tensors", "_versions",
                 "_addresses", "_others", "_marks")

    def __init__(self, layers: Iterable[Tuple[FoldCache, Any, nn.Module, nn.Module]]):
        self._caches, self._entries, self._norms, self._eps = [], [], [], []
        self._tables, self._names, self._held = [], [], []
        self._tensors, self._versions, self._addresses = [], [], []
        self._others = []
        for cache, entry, conv, norm in layers:
            held, marks, eps = entry[3]["sources"]
            tables = _source_tables(conv, norm)
            if tables is None:
                self._others.append((cache, entry, conv, norm))
                continue
            self._caches.append(cache)
            self._entries.append(entry)
            self._norms.append(norm)
            self._eps.append(eps)
            for (table, name), kept, mark in zip(tables, held, marks):
                self._tables.append(table)
                self._names.append(name)
                self._held.append(kept)
                if mark is not None:
                    self._tensors.append(kept)
                    self._versions.append(mark[0])
                    self._addresses.append(mark[1])
        # The same marks held in the extension, which checks them in one
        # loop (_C.sources_unchanged); None where it is not loaded, False
        # where a source changed since its entry was made.
        self._marks = None
        if native_loaded():
            from . import _C

            self._marks = self._held_unchanged() and _C.source_marks(self._tables, self._names, self._held,
                                                                      self._tensors)

    def _held_unchanged(self) -> bool:
        if self._marks is not None:
            from . import _C

            return self._marks is not False and _C.sources_unchanged(self._marks)
        return (
            all(map(operator.is_, map(dict.get, self._tables, self._names, itertools.repeat(_MISSING)), self._held))
            and list(map(_VERSION, self._tensors)) == self._versions
            and list(map(Tensor.data_ptr, self._tensors)) == self._addresses
        )

    def unchanged(self) -> bool:
        return (
            all(map(operator.is_, map(_ENTRY, self._caches), self._entries))
            and list(map(_EPS, self._norms)) == self._eps
            and self._held_unchanged()
            and all(cache.holds(entry, conv, norm) for cache, entry, conv, norm in self._others)
        )


_ENTRY, _EPS, _VERSION = operator.attrgetter("_entry"), operator.attrgetter("eps"), operator.attrgetter("_version")
_MISSING = object()


def _source_tables(conv: nn.Module, norm: nn.Module) -> Optional[List[Tuple[Dict[str, Any], str]]]:
    """(table, name) where _fold_sources finds each source, in its order;
    None where one is not in its module's parameter or buffer table."""
    found = []
    for module, names in zip((conv, norm), _FOLD_SOURCES):
        parameters, buffers = module.__dict__["_parameters"], module.__dict__["_buffers"]
        for name in names:
            if name in parameters:
                found.append((parameters, name))
            elif name in buffers:
                found.append((buffers, name))
            else:
                return None
    return found


def fold_cache(owner: nn.Module, name: str) -> Optional[FoldCache]:
    """The FoldCache that `owner` keeps for its conv called `name`, or None
    while torch.compile traces (the compiled graph folds by itself). Held as
    a plain attribute: not a buffer, so never in the state_dict."""
    if torch.compiler.is_compiling():
        return None
    caches = owner.__dict__.setdefault("_fold_caches", {})
    cache = caches.get(name)
    if cache is None:
        cache = caches[name] = FoldCache()
    return cache


def clear_fold_caches(module: nn.Module) -> None:
    """Drop every cached folded weight below module (and the recorded
    forwards made from them, resnet_fast.cpu_replay).

    Needed only after editing weights or BN buffers through `.data` (or
    another path that bypasses PyTorch's version counter, which the caches
    watch); optimizer steps, in-place edits under torch.no_grad(),
    load_state_dict and .to() are detected without it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for m in module.modules():
        for cache in m.__dict__.get("_fold_caches", {}).values():
            cache.clear()
        replays = m.__dict__.get("_cpu_replays")  # recorded forwards hold the steps made from them
        if replays is not None:
            replays.clear()


def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """conv and norm folded into (weight, bias) of dtype (default: the conv
    weight's), the fold itself computed in float32 (ops.fold_bn)."""
    weight = conv.weight if dtype is None else conv.weight.to(dtype)
    weight, bias = ops.fold_bn(
        weight, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps, conv.bias
    )
    return weight.contiguous(memory_format=torch.channels_last), bias
