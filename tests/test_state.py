"""No stale or lost state: the fold cache follows requires_grad_ and BN
running-stat updates (tests/test_models.py covers optimizer steps, in-place
edits, load_state_dict and .to()), concurrent eval forwards are correct,
the per-shape prepacked weights stay bounded over thousands of calls, and
the ops are deterministic under torch.use_deterministic_algorithms.
"""
import random
import threading

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import ops
from resnet_fast.folding import FoldCache

from conftest import assert_rel, kernel_backends
from models_util import pair

CPU_BACKENDS = ["reference"] + [b for b in kernel_backends() if b == "native"]


def _torchvision_twin(ours):
    tv = torchvision.models.resnet18(num_classes=ours.fc.out_features)
    tv.load_state_dict(ours.state_dict())
    return tv.train(ours.training)


# --------------------------------------------------------------- fold cache

def test_requires_grad_toggles_keep_folding_differentiable():
    """Eval-mode BN with trainable parameters: the folded weights carry
    gradients into conv and BN parameters; a fold cached while the
    parameters were frozen is not served once they require grad again."""
    _, ours = pair("resnet18", num_classes=6)
    ours.eval()
    x = torch.randn(2, 3, 32, 32)

    def grads_match_torchvision():
        tv = _torchvision_twin(ours).eval()
        for model in (ours, tv):
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
        for (name, p_tv), p_ours in zip(tv.named_parameters(), ours.parameters()):
            assert p_ours.grad is not None, name
            assert_rel(p_ours.grad, p_tv.grad, factor=20)

    grads_match_torchvision()
    ours.requires_grad_(False)
    with torch.no_grad():
        ours(x)  # fills the caches with detached folds
    ours.requires_grad_(True)
    grads_match_torchvision()
    # Frozen BN, trainable convs (a common fine-tuning set-up).
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.requires_grad_(False)
    ours.zero_grad(set_to_none=True)
    ours(x).sum().backward()
    assert ours.layer3[0].conv2.weight.grad is not None and ours.layer3[0].bn2.weight.grad is None


def test_train_mode_forward_updates_what_eval_folds():
    """A training forward updates BN running statistics in place; the next
    eval forward folds the new statistics, not the cached old ones."""
    _, ours = pair("resnet18", num_classes=6)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ours.eval()(x)  # caches folds of the initial statistics
        before = ours.layer2[1].bn1.running_mean.clone()
        ours.train()(torch.randn(4, 3, 40, 40) * 2 + 1)
        assert not torch.equal(before, ours.layer2[1].bn1.running_mean)
        ours.eval()
        assert_rel(ours(x), _torchvision_twin(ours).eval()(x))


# ------------------------------------------------------------------ threads

def test_concurrent_eval_forwards_match_single_threaded():
    """Several threads run one model on inputs of different shapes (each a
    different prepacked weight per layer, more shapes than the cache keeps),
    while another clears the caches: every output equals the single-threaded
    one."""
    _, model = pair("resnet18", num_classes=5)
    model.eval()
    shapes = [(1, 32, 32), (2, 40, 36), (1, 48, 40), (3, 33, 45), (1, 56, 24), (2, 24, 64)]
    inputs = [torch.randn(n, 3, h, w) for n, h, w in shapes]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    resnet_fast.clear_fold_caches(model)
    failures, stop = [], threading.Event()

    def worker(seed):
        order = list(range(len(inputs))) * 3
        random.Random(seed).shuffle(order)
        try:
            with torch.no_grad():
                for i in order:
                    out = model(inputs[i])
                    if not torch.allclose(out, expected[i], rtol=1e-4, atol=1e-5):
                        failures.append((seed, shapes[i], (out - expected[i]).abs().max().item()))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append((seed, repr(exc)))

    def clearer():
        while not stop.wait(0.005):
            resnet_fast.clear_fold_caches(model)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    cleaner = threading.Thread(target=clearer)
    cleaner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    cleaner.join()
    assert not failures, failures[:5]


# ------------------------------------------------------------------- memory

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _fold_caches(module):
    return [c for m in module.modules() for c in m.__dict__.get("_fold_caches", {}).values()]


def _packed_bytes(module) -> int:
    caches = _fold_caches(module)
    assert all(len(c._packed) <= FoldCache.MAX_PACKED_SHAPES for c in caches)
    return sum(t.numel() * t.element_size() for c in caches for t in c._packed.values())


def test_thousands_of_input_shapes_keep_memory_bounded():
    """2000 eval forwards of a block cycling through 50 input shapes, so
    that every call misses the per-layer LRU of packed weights and packs
    anew: never more than MAX_PACKED_SHAPES of them per layer, and resident
    memory flat over the last 1500 calls (anything kept per call, an output
    or a packed weight of ~37 KB, would add 50 MB or more)."""
    channels = 32
    block = resnet_fast.BasicBlock(channels, channels).eval()
    rng = random.Random(0)
    shapes = [(rng.randint(1, 2), rng.randint(4, 24), rng.randint(4, 24)) for _ in range(50)]
    inputs = {shape: torch.randn(shape[0], channels, *shape[1:]) for shape in shapes}
    weight_bytes = channels * channels * 9 * 4
    bound = 2 * FoldCache.MAX_PACKED_SHAPES * weight_bytes * 2  # 2 convs, 2x slack for blocked formats
    with torch.no_grad():
        for i in range(2000):
            block(inputs[shapes[i % len(shapes)]])
            if i == 499:
                warm = _rss_bytes()
            if i % 100 == 0:
                assert _packed_bytes(block) <= bound
    growth = _rss_bytes() - warm
    assert growth < 48 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB over 1500 calls"
    if "native" in kernel_backends() and torch.backends.mkldnn.is_available():
        caches = _fold_caches(block)
        assert len(caches) == 2 and all(len(c._packed) == FoldCache.MAX_PACKED_SHAPES for c in caches)


# ------------------------------------------------------------ determinism

@pytest.fixture
def deterministic():
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_are_deterministic_on_cpu(deterministic, backend):
    """Under torch.use_deterministic_algorithms(True) every op runs (no
    error) and two runs give bitwise equal outputs and gradients."""
    x = torch.randn(4, 16, 20, 20).contiguous(memory_format=torch.channels_last)  # 1600 rows: several chunks
    w, b = torch.randn(24, 16, 3, 3) * 0.1, torch.randn(24)
    res = torch.randn(4, 24, 20, 20)
    gamma, beta = torch.rand(24) + 0.5, torch.randn(24)
    grad = torch.randn(4, 24, 20, 20)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b, gamma, beta)]
        y = ops.conv_bias_act(leaves[0], leaves[1], leaves[2], res, padding=1, backend=backend)
        out, mean, invstd = ops.bn_act_train(y, leaves[3], leaves[4], residual=res, backend=backend)
        out.backward(grad)
        epilogue = ops.bias_act(y.detach(), b, res, backend=backend)
        return [y, out, mean, invstd, epilogue] + [leaf.grad for leaf in leaves]

    for a, b_ in zip(run(), run()):
        assert torch.equal(a, b_)


def test_training_step_is_deterministic_on_cpu(deterministic):
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        model = resnet_fast.resnet18(num_classes=4).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 48, 48)), torch.tensor([1, 3]))
        loss.backward()
        opt.step()
        results.append([loss.detach()] + [t.detach().clone() for t in model.state_dict().values()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
