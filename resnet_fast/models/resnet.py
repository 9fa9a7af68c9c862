"""ResNet, BasicBlock and Bottleneck with torchvision's module tree and
state_dict keys, running on the fused ops (resnet_fast.layers)."""
import numbers
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .. import cpu_linear, cpu_replay, ops
from ..backends import BACKENDS, native_loaded
from ..finite import finite_activations
from ..folding import fold_cache
from ..layers import conv_norm_act
from ..validation import check_pool_args, conv_output_shape
from .features import NUM_STAGES, FeatureInfo, last_n_indices, normalize_indices, stage_info
from .module_path import (block_parts, has_module_hooks, input_needs_modules, known_modules, must_call_modules,
                          trace_check_scope, why_parts)

# Where optimize() keeps the class a module had before it swapped it in: to_torchvision()
# restores it, and a swapped block that must call its modules runs its forward.
ORIGINAL_CLASS = "_class_before_resnet_fast"

NormLayer = Callable[[int], nn.Module]


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def fused_conv_norm(conv: nn.Module, norm: nn.Module, x: Tensor, residual: Optional[Tensor], relu: bool,
                    backend: Optional[str]) -> Tensor:
    """act(norm(conv(x)) + residual) on the fused ops; the folded weights are
    cached on the conv module."""
    return conv_norm_act(conv, norm, x, residual, relu, backend, fold_cache(conv, "folded"))


# torch.fx records a call of it (forward_intermediates) instead of tracing
# into its checks, which a symbolic trace cannot evaluate.
@torch.fx.wrap
def check_resnet_input(x: Tensor, conv1: nn.Module) -> None:
    """Raise a clear error when x cannot be the input of a ResNet whose first conv is conv1."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a Tensor input, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ValueError(f"expected a dense (strided) input, got layout {x.layout}; convert it with x.to_dense()")
    if x.dim() != 4:
        raise ValueError(
            f"expected a 4-D input (N, C, H, W), got {x.dim()}-D of shape {tuple(x.shape)}"
            + (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else "")
        )
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype} (convert images with x.float() / 255)")
    if x.shape[1] != conv1.in_channels:
        raise ValueError(
            f"expected input with {conv1.in_channels} channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    # A parameter of conv1, not conv1.weight: reading a parametrized weight
    # runs its parametrization (spectral_norm's power iteration: one more
    # step than torchvision's forward takes).
    weight = next(conv1.parameters(), None)
    if weight is None:
        return
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the model is on {weight.device}; move one with .to()")
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
    if x.dtype != weight.dtype and not autocast:
        raise TypeError(
            f"input dtype {x.dtype} does not match the model's {weight.dtype}; "
            "convert one of them, or run under torch.autocast"
        )


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
        bias=False, dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _FusedBlock(nn.Module):
    """What both block kinds share: the backend, the fold caches, the
    fused (conv, norm) calls, the shortcut, and the choice between the fused
    path and torchvision's module-by-module forward (module_path.py)."""

    backend: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles torchvision's forward
            return self._forward_modules(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor, x_disposable: bool = False) -> Tensor:
        """x_disposable: the caller needs x no more (ResNet's stage loop,
        which knows), so the block may write its output into it."""
        if self._runs_fused(x):
            return self._forward_fused(x, x_disposable)
        original = self.__dict__.get(ORIGINAL_CLASS)  # a block optimize() swapped: its own forward
        return original.forward(self, x) if original is not None else self._forward_modules(x)

    @torch.jit.unused
    def _forward_plain(self, x: Tensor, x_disposable: bool) -> Tensor:
        """_forward_eager for a block of a network that known_modules passed
        (no hooks anywhere), on an input that passed input_needs_modules at the
        network's entrance: only the block's own parts need a look."""
        if why_parts(self) is None:
            return self._forward_fused(x, x_disposable)
        cpu_replay.unrecordable()
        return self._forward_eager(x, x_disposable)

    @torch.jit.unused
    def _runs_fused(self, x: Tensor) -> bool:
        return not (input_needs_modules(x) or must_call_modules(self, block_parts(self)))

    @torch.jit.unused
    def _forward_fused(self, x: Tensor, x_disposable: bool = False) -> Tensor:
        raise NotImplementedError

    def _forward_modules(self, x: Tensor) -> Tensor:
        """The block's own modules, called as torchvision calls them."""
        raise NotImplementedError

    def _add_shortcut_and_relu(self, out: Tensor, x: Tensor) -> Tensor:
        """The end of torchvision's forward: out + shortcut(x), then ReLU."""
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    def __prepare_scriptable__(self):
        original = self.__dict__.get(ORIGINAL_CLASS)
        if original is not None and original.__module__.split(".")[0] == "timm":
            raise RuntimeError(
                f"resnet_fast: cannot script a timm {original.__name__} that resnet_fast.optimize() swapped; "
                "call resnet_fast.to_torchvision(model) first, or use torch.export"
            )
        return self

    def _fused(self, conv_name: str, norm_name: str, x: Tensor, residual: Optional[Tensor] = None,
               relu: bool = True, overwrite_residual: bool = False) -> Tensor:
        # The module table first: nn.Module's attribute lookup is slow, and this runs for every layer.
        modules = self._modules
        conv = modules[conv_name] if conv_name in modules else getattr(self, conv_name)
        norm = modules[norm_name] if norm_name in modules else getattr(self, norm_name)
        return conv_norm_act(conv, norm, x, residual, relu, self.backend, fold_cache(conv, "folded"), overwrite_residual)

    def _shortcut(self, x: Tensor, x_disposable: bool) -> Tuple[Tensor, bool]:
        """(the shortcut of x, whether the block may write into it)."""
        ds = self.downsample
        if ds is None:
            return x, x_disposable
        if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d):
            return fused_conv_norm(ds[0], ds[1], x, None, False, self.backend), True
        cpu_replay.unrecordable()
        return ds(x), False  # a custom shortcut: run it as it is (its output may be x itself)


class BasicBlock(_FusedBlock):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    @torch.jit.unused
    def _forward_fused(self, x: Tensor, x_disposable: bool = False) -> Tensor:
        identity, disposable = self._shortcut(x, x_disposable)
        out = self._fused("conv1", "bn1", x)
        return self._fused("conv2", "bn2", out, residual=identity, overwrite_residual=disposable)

    def _forward_modules(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._add_shortcut_and_relu(self.bn2(self.conv2(out)), x)


class Bottleneck(_FusedBlock):
    # The stride sits on the 3x3 conv (ResNet V1.5), as in torchvision.
    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @torch.jit.unused
    def _forward_fused(self, x: Tensor, x_disposable: bool = False) -> Tensor:
        identity, disposable = self._shortcut(x, x_disposable)
        out = self._fused("conv1", "bn1", x)
        out = self._fused("conv2", "bn2", out)
        return self._fused("conv3", "bn3", out, residual=identity, overwrite_residual=disposable)

    def _forward_modules(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._add_shortcut_and_relu(self.bn3(self.conv3(out)), x)


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_architecture(block, layers, num_classes, groups, width_per_group, norm_layer) -> None:
    """ResNet's constructor arguments, each named in its error."""
    if not (isinstance(block, type) and issubclass(block, nn.Module) and isinstance(getattr(block, "expansion", None), int)):
        raise TypeError(f"block must be BasicBlock, Bottleneck or a block class like them (with `expansion`), got {block!r}")
    counts = list(layers) if isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)) else None
    if counts is None or len(counts) != 4 or not all(_positive_int(n) for n in counts):
        raise ValueError(f"layers must be 4 positive block counts, got {layers!r}")
    for name, value in (("num_classes", num_classes), ("groups", groups), ("width_per_group", width_per_group)):
        if not _positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if norm_layer is not None and not callable(norm_layer):
        raise TypeError(f"norm_layer must be callable (channels -> module), got {type(norm_layer).__name__}")


class ResNet(nn.Module):
    """torchvision.models.ResNet on fused kernels.

    Same constructor arguments, module tree and state_dict keys as
    torchvision's, plus `backend` ("native", "reference", "triton", or None
    for the best available on the input's device; settable later).
    Inputs are converted to channels_last once, at the stem.

    `features_only=True` makes a backbone, as timm's features_only models
    are: forward returns the list of feature maps at `out_indices` (0 = C1,
    the stem's activation, ... 4 = C5, layer4; negative indices count from
    the end; default all five), `feature_info` describes them, and the
    modules it does not need are dropped: avgpool, fc, and the layers after
    the deepest requested stage (the maxpool too when only C1 is asked
    for). Its state_dict holds torchvision's keys of what remains, and
    loading a full torchvision or timm state_dict into it ignores the
    dropped modules' keys.
    """

    # TorchScript compiles torchvision's forward only (_forward_modules).
    __jit_unused_properties__ = ["backend", "feature_info"]

    # Class-level defaults, so a torchvision ResNet whose class optimize()
    # swapped in place behaves as a full model.
    features_only: bool = False
    out_indices: Tuple[int, ...] = tuple(range(NUM_STAGES))
    removed_modules: Tuple[str, ...] = ()

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[Sequence[bool]] = None,
        norm_layer: Optional[NormLayer] = None,
        backend: Optional[str] = None,
        features_only: bool = False,
        out_indices: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        _check_architecture(block, layers, num_classes, groups, width_per_group, norm_layer)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if out_indices is not None and not features_only:
            raise ValueError("out_indices selects the outputs of a features_only model: pass features_only=True too")
        self._norm_layer = norm_layer
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None or a 3-element tuple, "
                f"got {replace_stride_with_dilation}"
            )
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)
        self.backend = backend
        if features_only:
            self._keep_only_features(normalize_indices(range(NUM_STAGES) if out_indices is None else out_indices))

    def _keep_only_features(self, out_indices: Tuple[int, ...]) -> None:
        deepest = max(out_indices)
        removed = ["avgpool", "fc"] + [f"layer{i}" for i in range(deepest + 1, NUM_STAGES)]
        if deepest == 0:
            removed.append("maxpool")
        for name in removed:
            delattr(self, name)
        self.features_only = True
        self.out_indices = out_indices
        self.removed_modules = tuple(removed)

    def is_removed_key(self, key: str) -> bool:
        """Whether a state_dict key belongs to a module this features_only model dropped."""
        return key.split(".", 1)[0] in self.removed_modules

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A full torchvision/timm state_dict loads into a features_only model:
        # the keys of the modules it dropped are skipped, not "unexpected".
        for key in [k for k in state_dict if k.startswith(prefix) and self.is_removed_key(k[len(prefix):])]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # Each residual branch starts at zero, so each block starts as the identity.
            for m in self.modules():
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_bn is not None and last_bn.weight is not None:
                    nn.init.constant_(last_bn.weight, 0)

    def _make_layer(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers: List[nn.Module] = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, norm_layer)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                      dilation=self.dilation, norm_layer=norm_layer)
            )
        return nn.Sequential(*layers)

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        """Which backend every fused layer uses (None: best available)."""
        if value is not None and value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; expected one of {BACKENDS} or None")
        self._backend = value
        for m in self.modules():
            if isinstance(m, _FusedBlock):
                m.backend = value

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error when x cannot be this model's input."""
        check_resnet_input(x, self.conv1)

    @property
    def feature_info(self) -> FeatureInfo:
        """Channels ("num_chs"), reduction and module of each feature map
        forward returns (features_only) or forward_intermediates can return."""
        indices = self.out_indices if self.features_only else tuple(range(len(stage_info(self))))
        return FeatureInfo(stage_info(self), indices)

    def _num_stages(self) -> int:
        return 1 + sum(hasattr(self, f"layer{i}") for i in range(1, NUM_STAGES))

    def forward_stem(self, x: Tensor) -> Tensor:
        """conv1 + bn1 + relu (C1) and the maxpool."""
        return self.maxpool(self._stem_act(x))

    def _stem_act(self, x: Tensor) -> Tensor:
        if input_needs_modules(x) or must_call_modules(self, (self.conv1, self.bn1, self.relu)):
            # torchvision's stem, on the input as given (the blocks take any layout)
            cpu_replay.unrecordable()
            return self.relu(self.bn1(self.conv1(x)))
        x = cpu_replay.call(_channels_last, x)
        return fused_conv_norm(self.conv1, self.bn1, x, None, True, self.backend)

    def _run_stages(self, x: Tensor, indices: Tuple[int, ...], last: int) -> Tuple[Tensor, List[Tensor]]:
        """Run stages 0..last; (output of stage `last`, outputs of `indices`)."""
        modules = None if torch.compiler.is_compiling() or input_needs_modules(x) else known_modules(self, _FusedBlock)
        if modules is None:
            return self._stages(x, indices, last, plain=False)
        with finite_activations(x):  # one scan for NaN/Inf instead of one per layer
            # Replayed from a recording of an earlier call where one applies (cpu_replay).
            return cpu_replay.forward(self, x, (indices, last), modules, (BasicBlock, Bottleneck),
                                      lambda: self._stages(x, indices, last, plain=True))

    def _stages(self, x: Tensor, indices: Tuple[int, ...], last: int, plain: bool) -> Tuple[Tensor, List[Tensor]]:
        """_run_stages's work. plain: no hooks and only known modules below
        (module_path.known_modules), so the blocks are called directly and each
        may write its output into an input that nothing else holds."""
        if plain and last > 0 and 0 not in indices and self._stem_images_per_chunk(x) < x.shape[0]:
            x, features = cpu_replay.call(self._stem_pooled_in_chunks, x), []
        else:
            x = self._stem_act(x)
            features = [x] if 0 in indices else []
            if last > 0:
                x = cpu_replay.call(self._maxpool_plain, x) if plain else self.maxpool(x)
        for i in range(1, last + 1):
            stage = getattr(self, f"layer{i}")
            if plain and isinstance(stage, nn.Sequential):
                x = self._plain_stage(stage, x, x_disposable=i - 1 not in indices)
            else:
                x = stage(x)
            if i in indices:
                features.append(x)
        return x, features

    # The stem's output (64 channels at half the input's size: 51 MB for 16
    # images of 224x224 in float32) is the network's largest activation, and
    # the peak of an eval forward's memory. Pooled a few images at a time, it
    # is never made whole. Each part costs a oneDNN call and a pass through
    # the layer's Python, and fewer, larger parts measured faster on a
    # 2-core Xeon: 16 MB parts took a resnet50 bfloat16 stem at batch 8 (one
    # part) from 3.6 to 2.5 ms against 8 MB ones (two), and 32 MB parts made
    # the whole resnet50 forward 2-3% faster than 16 MB ones at batch 8 and
    # 16 in float32 (two parts instead of three or four) and in bfloat16 at
    # batch 16 (one part instead of two). Eager PyTorch holds the stem's
    # output twice over (the convolution's and the norm's).
    STEM_CHUNK_BYTES = 32 << 20

    def _stem_images_per_chunk(self, x: Tensor) -> int:
        """How many images the stem takes at a time on the way to the max
        pooling (in inference on the CPU: x.shape[0], all of them, elsewhere)."""
        conv, norm, pool = self.conv1, self.bn1, self.maxpool
        if not (type(conv) is nn.Conv2d and not isinstance(conv.padding, str) and type(pool) is nn.MaxPool2d
                and not pool.return_indices and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and x.dim() == 4 and not torch.is_grad_enabled() and native_loaded()
                and not (isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)) and norm.training)):
            return x.shape[0]
        try:
            _, channels, height, width = conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding,
                                                           conv.dilation)
        except ValueError:  # too small for conv1: the whole batch, which raises as it would without parts
            return x.shape[0]
        return max(1, self.STEM_CHUNK_BYTES // (channels * height * width * x.element_size()))

    def _stem_pooled_in_chunks(self, x: Tensor) -> Tensor:
        """self.maxpool(stem(x)), the stem run on a few images at a time
        (_stem_images_per_chunk), in parts of equal size, each pooled
        straight into its slice of the result."""
        batch = x.shape[0]
        parts = -(-batch // self._stem_images_per_chunk(x))
        size = -(-batch // parts)
        pool = self.maxpool  # a plain nn.MaxPool2d (_stem_images_per_chunk)
        out = None
        for start in range(0, batch, size):
            y = self._stem_act(x[start:start + size])
            if out is None:
                window = (_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation))
                spatial = check_pool_args(y.shape, *window, pool.ceil_mode)
                out = torch.empty((batch, y.shape[1], *spatial), dtype=y.dtype, device=y.device,
                                  memory_format=torch.channels_last)
            ops.max_pool2d_nhwc(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                                out=out[start:start + size])
        return out

    def _maxpool_plain(self, x: Tensor) -> Tensor:
        """self.maxpool(x) in a network without hooks: a plain nn.MaxPool2d
        over CPU activations that need no gradient by ops.max_pool2d_nhwc
        (no indices)."""
        pool = self.maxpool
        if (type(pool) is nn.MaxPool2d and not pool.return_indices and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16) and not (x.requires_grad and torch.is_grad_enabled())
                and native_loaded()):
            return ops.max_pool2d_nhwc(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        return pool(x)

    @staticmethod
    def _plain_stage(stage: nn.Sequential, x: Tensor, x_disposable: bool) -> Tensor:
        for block in stage:
            if isinstance(block, _FusedBlock):
                x, x_disposable = block._forward_plain(x, x_disposable), True
            else:  # a known module of another kind: its output may be its input
                x, x_disposable = cpu_replay.call(block, x), False
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map (C5 for a full model), before pooling."""
        return self._run_stages(x, (), self._num_stages() - 1)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooling and the classifier on a forward_features output;
        pre_logits=True stops before the classifier (pooled features)."""
        if self.features_only:
            raise RuntimeError("a features_only model has no head (avgpool and fc were dropped)")
        x = self._pooled_flat(x)
        return x if pre_logits else self._classified(x)

    def _classified(self, x: Tensor) -> Tensor:
        """self.fc(x); for a plain nn.Linear without hooks on the CPU, on a
        weight prepacked for the batch size where that applies (cpu_linear)."""
        fc = self.fc
        # A plain tensor first: under torch.fx's symbolic trace x is a Proxy.
        if type(fc) is nn.Linear and type(x) is Tensor and x.device.type == "cpu" and not has_module_hooks(fc):
            return cpu_linear.linear(fc, x)
        return fc(x)

    def _pooled_flat(self, x: Tensor) -> Tensor:
        """torch.flatten(self.avgpool(x), 1); for a global average over CPU
        activations that need no gradient, by ops.global_avg_pool_nhwc (aten's
        pooling and flatten took 0.3-1.3 ms of a ResNet-50 forward in bfloat16,
        this a fraction of it)."""
        pool = self.avgpool
        # Tracing and compiling first: under a trace a comparison of sizes is recorded.
        if (type(pool) is nn.AdaptiveAvgPool2d and type(x) is Tensor and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and _pair(pool.output_size) == (1, 1)
                and x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
                and x.shape[0] > 0 and x.shape[2] * x.shape[3] > 0 and not (x.requires_grad and torch.is_grad_enabled())
                and native_loaded() and not has_module_hooks(pool)):
            return ops.global_avg_pool_nhwc(x)
        return torch.flatten(pool(x), 1)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """(final feature map, [feature maps at `indices`]), as timm returns them.

        indices: None for every stage, an int n for the last n stages, or a
        sequence of stage indices (0 = C1 ... 4 = C5; negative from the end).
        stop_early: stop after the deepest requested stage (the final map is
        then that stage's). `norm` is accepted for timm compatibility: a
        ResNet has no final norm layer. intermediates_only: return only the list.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (the only layout a ResNet's maps have), got {output_fmt!r}")
        num_stages = self._num_stages()
        if indices is None:
            wanted = tuple(range(num_stages))
        elif isinstance(indices, int) and not isinstance(indices, bool):
            wanted = last_n_indices(indices, num_stages)
        else:
            wanted = normalize_indices(indices, num_stages, name="indices")
        check_resnet_input(x, self.conv1)
        last = max(wanted) if stop_early or intermediates_only else num_stages - 1
        final, features = self._run_stages(x, wanted, last)
        return features if intermediates_only else (final, features)

    def forward(self, x: Tensor) -> Tensor:
        # Annotated as torchvision's (a Tensor) for TorchScript; a
        # features_only model returns the list of feature maps.
        if torch.jit.is_scripting():  # TorchScript compiles torchvision's forward
            return self._forward_modules(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        if not (torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)):  # traces record torchvision's graph
            check_resnet_input(x, self.conv1)
        with trace_check_scope():
            if self.features_only:
                return self._run_stages(x, self.out_indices, max(self.out_indices))[1]  # type: ignore[return-value]
            return self.forward_head(self.forward_features(x))

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's forward, module by module (what TorchScript runs)."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    def __prepare_scriptable__(self):
        if self.features_only:
            raise RuntimeError(
                "resnet_fast: torch.jit.script takes full models (torchvision's); for a features_only backbone use "
                "torch.export, or script torchvision's IntermediateLayerGetter around a full model"
            )
        return self
