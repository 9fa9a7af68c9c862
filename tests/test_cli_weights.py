"""The resnet-fast command with torchvision's weights by name: predict,
eval and finetune take the weights' preprocessing (transforms()) and, with
the original head, their category names. The weights are random ones placed
in a fresh torch.hub cache under torchvision's file name: nothing is
downloaded."""
import json
import os
import urllib.error

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402
from torchvision.transforms.v2.functional import pil_to_tensor  # noqa: E402

from resnet_fast.cli import main  # noqa: E402
from resnet_fast.models import download  # noqa: E402
from resnet_fast.training.checkpoint import load_checkpoint  # noqa: E402
from resnet_fast.training.data import Preprocess, image_file_to_input  # noqa: E402

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
CATEGORIES = WEIGHTS.meta["categories"]


def _photo(path, seed: int, size=(83, 61)) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
    Image.fromarray(pixels).save(path)
    return str(path)


def _torchvision_top1(model, path: str) -> str:
    x = WEIGHTS.transforms()(pil_to_tensor(Image.open(path).convert("RGB"))).unsqueeze(0)
    with torch.no_grad():
        return CATEGORIES[int(model(x).argmax())]


@pytest.mark.parametrize("weights", [WEIGHTS, torchvision.models.ResNet50_Weights.IMAGENET1K_V2])
@pytest.mark.parametrize("image_size", [None, 160])
def test_preprocessing_of_weights_is_their_transforms(tmp_path, weights, image_size):
    path = _photo(tmp_path / "photo.png", 1, size=(301, 257))
    pre = Preprocess.of_weights(weights, image_size)
    ours = image_file_to_input(path, pre)
    transform = weights.transforms()
    if image_size is not None:  # the same recipe at another crop, the resize scaled with it
        transform = type(transform)(crop_size=image_size,
                                    resize_size=round(transform.resize_size[0] * image_size / transform.crop_size[0]))
    theirs = transform(pil_to_tensor(Image.open(path).convert("RGB"))).unsqueeze(0)
    assert ours.shape == theirs.shape
    # Equal up to one 8-bit level: the two resize kernels round uint8 pixels apart.
    one_level = 1 / 255 / min(transform.std)
    torch.testing.assert_close(ours, theirs, atol=1.01 * one_level, rtol=0)


def test_predict_with_default_weights_names_imagenet_categories(cached_resnet18, tmp_path, capsys):
    paths = [_photo(tmp_path / f"p{i}.png", i) for i in range(3)]
    out = tmp_path / "pred.json"
    assert main(["predict", "--weights", "DEFAULT", "--arch", "resnet18", "--json", str(out), *paths]) == 0
    results = json.loads(out.read_text())
    assert [r["top"][0]["class"] for r in results] == [_torchvision_top1(cached_resnet18, p) for p in paths]
    assert all(t["class"] in CATEGORIES for r in results for t in r["top"])
    assert results[0]["top"][0]["class"] in capsys.readouterr().out


def _category_folders(root, names, per_class=3):
    for c, name in enumerate(names):
        for split in ("train", "val"):
            os.makedirs(root / split / name)
            for i in range(per_class):
                _photo(root / split / name / f"{i}.png", 100 * c + i + (50 if split == "val" else 0))


def test_eval_with_default_weights_reports_on_the_categories_seen(cached_resnet18, tmp_path, capsys):
    names = [CATEGORIES[0], CATEGORIES[1], CATEGORIES[2]]  # tench, goldfish, great white shark
    _category_folders(tmp_path / "data", names)
    out_dir = tmp_path / "eval"
    assert main(["eval", "--weights", "IMAGENET1K_V1", "--arch", "resnet18", "--data", str(tmp_path / "data"),
                 "--no-progress", "--output", str(out_dir)]) == 0
    report = json.loads((out_dir / "eval.json").read_text())
    files = sorted((tmp_path / "data" / "val").glob("*/*.png"))
    predicted = [_torchvision_top1(cached_resnet18, str(p)) for p in files]
    truth = [p.parent.name for p in files]
    assert report["top1"] == pytest.approx(sum(a == b for a, b in zip(predicted, truth)) / len(files))
    assert set(report["class_names"]) == set(names) | set(predicted)  # the classes seen, not all 1000
    assert all(report["per_class"][name]["support"] == 3 for name in names)


def test_eval_on_folders_that_are_not_categories_says_what_to_do(cached_resnet18, tmp_path, capsys):
    _category_folders(tmp_path / "data", ["n01440764", CATEGORIES[1]])
    assert main(["eval", "--weights", "DEFAULT", "--arch", "resnet18", "--data", str(tmp_path / "data"),
                 "--no-progress", "--output", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "n01440764" in err and "named by its categories" in err and "resnet-fast finetune" in err


def test_finetune_from_named_weights_keeps_their_preprocessing(cached_resnet18, tmp_path):
    _category_folders(tmp_path / "data", ["cat", "dog"], per_class=4)
    run = tmp_path / "run"
    assert main(["finetune", "--weights", "IMAGENET1K_V1", "--arch", "resnet18", "--data", str(tmp_path / "data"),
                 "--freeze", "backbone", "--epochs", "1", "--batch-size", "4", "--image-size", "64",
                 "--no-progress", "--output", str(run)]) == 0
    ckpt = load_checkpoint(str(run / "last.pt"))
    transform = WEIGHTS.transforms()
    assert ckpt["preprocess"]["mean"] == pytest.approx(list(transform.mean))
    assert ckpt["preprocess"]["resize_size"] == round(transform.resize_size[0] * 64 / transform.crop_size[0])
    torch.testing.assert_close(ckpt["model"]["conv1.weight"], cached_resnet18.conv1.weight.detach())  # frozen
    assert ckpt["model"]["fc.weight"].shape == (2, 512)


def test_weights_that_cannot_be_downloaded_fail_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    assert main(["predict", "--weights", "DEFAULT", "--arch", "resnet18", _photo(tmp_path / "a.png", 0)]) == 2
    err = capsys.readouterr().err
    assert WEIGHTS.url in err and "place it at" in err


def test_unknown_weights_name_lists_the_choices(tmp_path, capsys):
    assert main(["predict", "--weights", "IMAGENET1K_V7", "--arch", "resnet18", _photo(tmp_path / "a.png", 0)]) == 2
    assert "choose one of DEFAULT, IMAGENET1K_V1" in capsys.readouterr().err
