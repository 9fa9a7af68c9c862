"""Loading weights (files, checkpoints, torchvision enums) and converting
torchvision models, with clear errors for what does not fit."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import resnet_fast

from conftest import assert_rel
from resnet_fast.testing import randomize_batchnorm_


@pytest.fixture
def tv18():
    model = torchvision.models.resnet18(num_classes=7)
    randomize_batchnorm_(model)
    return model.eval()


def _check_same_outputs(ours, tv):
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert_rel(ours.eval()(x), tv.eval()(x))


@pytest.mark.parametrize("form", ["pth", "safetensors", "checkpoint", "ddp", "mapping"])
def test_weights_argument_loads_every_form(tmp_path, tv18, form):
    state = tv18.state_dict()
    path = tmp_path / f"weights.{form}"
    if form == "pth":
        torch.save(state, path)
    elif form == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif form == "checkpoint":
        torch.save({"model": state, "epoch": 3, "optimizer": {}}, path)
    elif form == "ddp":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    source = state if form == "mapping" else str(path)
    _check_same_outputs(resnet_fast.resnet18(weights=source, num_classes=7), tv18)


@pytest.mark.parametrize("form", ["enum", "DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "url"])
def test_torchvision_weights_by_enum_name_or_url(cached_resnet18, form):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    given = {"enum": weights, "url": weights.url}.get(form, form)
    ours = resnet_fast.resnet18(weights=given)
    assert ours.fc.out_features == len(weights.meta["categories"])  # num_classes from the categories
    _check_same_outputs(ours, cached_resnet18)
    assert torch.equal(resnet_fast.read_state_dict("ResNet18_Weights.DEFAULT")["fc.weight"],
                       cached_resnet18.fc.weight)


def test_weights_backbone_drops_the_head(cached_resnet18):
    backbone = resnet_fast.resnet18(weights="DEFAULT", features_only=True, out_indices=(2, 4)).eval()
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [128, 512]


@pytest.mark.parametrize("builder, weights, message", [
    ("resnet50", "ResNet18_Weights.DEFAULT", "are not weights for resnet50: use ResNet50_Weights"),
    ("resnet50", torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "are not weights for resnet50"),
    ("resnet18", "IMAGENET1K_V9", "has no weights named 'IMAGENET1K_V9'; choose one of DEFAULT, IMAGENET1K_V1"),
    ("resnet18", "Nonsense_Weights.DEFAULT", "not weights for resnet18"),
])
def test_weights_for_another_network_are_refused(cached_resnet18, builder, weights, message):
    with pytest.raises(ValueError, match=message):
        getattr(resnet_fast, builder)(weights=weights)


def test_num_classes_must_fit_the_weights_categories(cached_resnet18):
    with pytest.raises(ValueError, match=r"num_classes=10 does not fit the resnet18 weights .*1000 classes.*exclude"):
        resnet_fast.resnet18(weights="DEFAULT", num_classes=10)
    few = resnet_fast.load_weights(resnet_fast.resnet18(num_classes=10), "ResNet18_Weights.DEFAULT", exclude=("fc.",))
    assert torch.equal(few.conv1.weight, cached_resnet18.conv1.weight)


def test_a_bare_name_needs_a_network():
    with pytest.raises(ValueError, match="without saying for which network"):
        resnet_fast.read_state_dict("DEFAULT")


def test_timm_hub_name_reads_huggingface_hubs_cache(tmp_path, tv18):
    """weights="timm/<model>" through huggingface_hub, offline, from a cache
    laid out as huggingface_hub lays it out."""
    pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--timm--resnet18.tiny_test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tv18.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    script = (
        "import torch, resnet_fast\n"
        "m = resnet_fast.resnet18(weights='timm/resnet18.tiny_test', num_classes=7)\n"
        "print(float(m.fc.weight.sum()))\n"
        "try:\n"
        "    resnet_fast.resnet18(weights='timm/resnet18.not_cached')\n"
        "except RuntimeError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, error = out.stdout.strip().splitlines()[-2:]
    assert float(first) == pytest.approx(float(tv18.fc.weight.detach().sum()), rel=1e-6)
    assert error.startswith("ERROR could not get the weights of timm/resnet18.not_cached from the Hugging Face hub")


def test_mismatched_weights_list_the_keys(tmp_path, tv18):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(num_classes=7).state_dict(), path)
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): layer1\.2\.bn1\.bias"):
        resnet_fast.resnet18(weights=str(path), num_classes=7)
    with pytest.raises(ValueError, match=r"shape mismatches \(2\): fc\.bias: file \(7,\) vs model \(10,\)"):
        resnet_fast.resnet18(weights=tv18.state_dict(), num_classes=10)
    state = dict(tv18.state_dict())
    del state["layer4.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer4\.1\.bn2\.running_var"):
        resnet_fast.resnet18(weights=state, num_classes=7)


@pytest.mark.parametrize(
    "content,message",
    [
        ([1, 2, 3], "does not hold a state_dict"),
        ({"epoch": 3}, "does not hold a state_dict"),
        ("truncated", "could not be read"),
        ("pickle", "could not be read"),
    ],
)
def test_files_that_are_not_state_dicts_are_rejected(tmp_path, tv18, content, message):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        torch.save(tv18.state_dict(), path)
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "pickle":
        torch.save({"model": tv18}, path)  # a whole pickled module: refused by weights_only
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        resnet_fast.resnet18(weights=str(path), num_classes=7)


def test_missing_file_and_bad_types():
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resnet_fast.resnet18(weights="/nonexistent/weights.pth")
    with pytest.raises(TypeError, match="weights must be a torchvision weights enum or its name, a URL, a file path"):
        resnet_fast.resnet18(weights=3)
    with pytest.raises(ValueError, match="conflicts with this architecture"):
        resnet_fast.resnext50_32x4d(groups=4)


def test_corrupt_safetensors_is_rejected(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        resnet_fast.resnet18(weights=str(path))


# ------------------------------------------------------------- conversion

@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.resnet18(num_classes=7),
        lambda: torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]),
        lambda: torchvision.models.resnext50_32x4d(num_classes=3),
    ],
    ids=["resnet18", "resnet50-dilated", "resnext50"],
)
def test_from_torchvision_gives_the_same_model(build):
    tv = build()
    randomize_batchnorm_(tv)
    ours = resnet_fast.from_torchvision(tv.eval())
    assert isinstance(ours, resnet_fast.ResNet) and not ours.training
    _check_same_outputs(ours, tv)


def test_from_torchvision_keeps_replaced_modules_and_mode(tv18):
    tv18.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    tv18.fc = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(512, 4))
    tv18.train()
    ours = resnet_fast.from_torchvision(tv18)
    assert ours.training and isinstance(ours.fc, torch.nn.Sequential)
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        assert_rel(ours.eval()(x), tv18.eval()(x))


def test_from_torchvision_rejects_other_models():
    with pytest.raises(TypeError, match="is not a torchvision ResNet"):
        resnet_fast.from_torchvision(torchvision.models.mobilenet_v3_small())


# ------------------------------------------------------------ safe loading

class _Payload:
    """Unpickling this runs os.mkdir(path): what weights_only must prevent."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_code_is_never_run(tmp_path, tv18):
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "trojan.pth"
    torch.save({**tv18.state_dict(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match=r"trojan\.pth could not be read .*weights_only=True") as info:
        resnet_fast.resnet18(weights=str(path), num_classes=7)
    assert not marker.exists()
    assert "mkdir" in str(info.value)  # torch names what it refused


@pytest.mark.parametrize("damage", ["flip@0.2", "flip@0.5", "flip@0.8", "cut@0.3", "cut@0.9", "cut@0.999"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_damaged_files_are_refused_naming_the_file(tmp_path, tv18, fmt, damage):
    """A truncated file, or one with a flipped byte anywhere (.pth: zip
    checksums; .safetensors has none for its data, so only header damage
    and truncation are detectable there)."""
    path = tmp_path / f"damaged.{fmt}"
    state = {k: v.contiguous() for k, v in tv18.state_dict().items()}
    torch.save(state, path) if fmt == "pth" else save_file(state, str(path))
    data = bytearray(path.read_bytes())
    kind, where = damage.split("@")
    if kind == "flip":
        if fmt == "safetensors":  # inside the JSON header
            where = 8 / len(data) + float(where) * int.from_bytes(data[:8], "little") / len(data)
        data[int(len(data) * float(where))] ^= 0xFF
    else:
        data = data[:int(len(data) * float(where))]
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"damaged.{fmt}"):
        resnet_fast.resnet18(weights=str(path), num_classes=7)
