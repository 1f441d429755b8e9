"""The model: spec architecture, normalisation inside forward, Hub round trips, strict loading."""

import json

import pytest
import torch
from huggingface_hub import constants

from catdog_model import CatDogClassifier, ModelLoadError, load_predictor
from conftest import complete_folder


def test_the_architecture_and_its_parameter_counts_at_224(spec_model):
    model = spec_model
    counts = [sum(p.numel() for p in part.parameters()) for part in (model.backbone, model.head)]
    assert counts == [23_508_032, 102_762_497]
    flatten, hidden, relu, dropout, out = model.head
    assert isinstance(flatten, torch.nn.Flatten) and isinstance(relu, torch.nn.ReLU)
    assert (hidden.in_features, hidden.out_features) == (2048 * 7 * 7, 1024)
    assert dropout.p == 0.2 and (out.in_features, out.out_features) == (1024, 1)
    assert model.backbone(torch.zeros(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    assert model.labels == ("cat", "dog")


def test_forward_applies_the_backbones_own_normalisation():
    torch.manual_seed(0)
    model = CatDogClassifier(image_size=64).eval()
    cfg = model.backbone.pretrained_cfg
    pixels = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.head(model.backbone((pixels - mean) / std)).squeeze(-1)
        assert torch.allclose(model(pixels), expected, atol=1e-6)
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_save_and_from_pretrained_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = CatDogClassifier(image_size=64, hidden_size=32, labels=("kitten", "puppy")).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"backbone": "resnet50", "dropout": 0.2, "hidden_size": 32, "image_size": 64,
                      "labels": ["kitten", "puppy"], "pretrained": False, "temperature": 1.0,
                      "ood_threshold": None}
    loaded = CatDogClassifier.from_pretrained(tmp_path).eval()
    pixels = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pixels), loaded(pixels))
    assert loaded.labels == ("kitten", "puppy")


def test_from_pretrained_never_downloads_imagenet_weights(tmp_path):
    CatDogClassifier(image_size=64, hidden_size=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, pretrained=True)))
    # Offline (conftest): a download attempt would raise.
    assert CatDogClassifier.from_pretrained(tmp_path).image_size == 64


def test_from_pretrained_is_strict_where_the_mixin_is_not(tmp_path):
    from safetensors.torch import load_file, save_file

    CatDogClassifier(backbone="resnet18", image_size=32, hidden_size=8).save_pretrained(tmp_path)
    config, weights = json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 16}))
    with pytest.raises(RuntimeError, match="head.1.weight"):
        CatDogClassifier.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({**weights, "head.9.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="head.9.weight"):
        CatDogClassifier.from_pretrained(tmp_path)


def _snapshot(tmp_path, repo_id: str, commit: str, refs: list[str], **model_args) -> CatDogClassifier:
    """Lay out a model in the Hugging Face cache exactly as a download would."""
    model = CatDogClassifier(**model_args).eval()
    repo_dir = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    complete_folder(model, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return model


@pytest.mark.slow
def test_load_by_repo_id_and_revision_through_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(0)
    # timm's 0.4M-parameter test_resnet: what is tested is the cache's resolution, not the architecture.
    main = _snapshot(tmp_path, "someone/catdog", "a" * 40, ["main"], backbone="test_resnet", image_size=64, hidden_size=8)
    tagged = _snapshot(tmp_path, "someone/catdog", "b" * 40, ["v1"], backbone="test_resnet", image_size=32, hidden_size=8)
    pixels = torch.rand(2, 3, 64, 64)

    from_main = CatDogClassifier.from_pretrained("someone/catdog", cache_dir=tmp_path / "hub")
    with torch.no_grad():
        assert torch.equal(from_main.eval()(pixels), main(pixels))
    tagged_in_torch = CatDogClassifier.from_pretrained("someone/catdog", revision="v1", cache_dir=tmp_path / "hub")
    with torch.no_grad():
        assert torch.equal(tagged_in_torch.eval()(pixels[:, :, :32, :32]), tagged(pixels[:, :, :32, :32]))
    predictor = load_predictor("someone/catdog@v1")  # its engine is the 32 px model's
    assert (predictor.source, predictor.revision, predictor.image_size) == ("someone/catdog", "v1", 32)


def test_unknown_repo_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="Could not download 'nobody/nothing'"):
        load_predictor("nobody/nothing")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_predictor(str(tmp_path))
