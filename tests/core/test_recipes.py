"""Recipes (core/recipes.py): what a run leaves out comes from its recipe, what it sets wins, and the resolved
values are what a config / job spec holds; `lowrank recipes` lists them."""
from __future__ import annotations

import json

import pytest

from core.names import DATASETS, MODELS
from core.recipes import RECIPE_FIELDS, RECIPES, default_recipe, recipe_values, resolve
from core.train import TrainConfig
from jobs.specs import TrainSpec
from lowrank.cli import main


def test_every_recipe_gives_every_recipe_field_and_validates_for_every_model():
    for name in RECIPES:
        for model in MODELS:
            values = recipe_values(name, model)
            assert set(RECIPE_FIELDS) <= set(values), (name, model)
            dataset = RECIPES[name].datasets[0]
            config = TrainConfig.from_dict({"model": model, "dataset": dataset, "recipe": name, "rank_ratio": 0.25,
                                            "device": "cpu", **({"data_root": "/data"} if dataset == "imagefolder"
                                                                else {})})
            assert {k: getattr(config, k) for k in values} == values


def test_left_out_takes_the_recipe_set_wins_null_is_left_out():
    base = {"model": "resnet18", "dataset": "digits", "rank_ratio": 0.25}
    config = TrainConfig.from_dict(base)
    assert config.recipe == "digits"
    assert (config.epochs, config.batch_size, config.lr, config.nesterov, config.warmup_epochs) == (3, 64, 0.02, True, 0.5)
    assert (config.image_size, config.small_input) == (8, True)  # digits' native 8 px; <= 64 px: small stem
    mine = TrainConfig.from_dict({**base, "lr": 0.05, "nesterov": False, "epochs": 7, "small_input": False,
                                  "warmup_epochs": None})
    assert (mine.lr, mine.nesterov, mine.epochs, mine.small_input, mine.warmup_epochs) == (0.05, False, 7, False, 0.5)
    assert mine.batch_size == 64 and mine.recipe == "digits"


def test_the_default_recipe_follows_the_data_set_and_the_model_family():
    assert {ds: default_recipe(ds) for ds in DATASETS} == {
        "imagefolder": "imagenet", "cifar10": "cifar", "cifar100": "cifar", "digits": "digits", "synthetic": "synthetic"}
    resnet = resolve({"model": "resnet50", "dataset": "imagefolder"})
    effnet = resolve({"model": "efficientnet_b0", "dataset": "imagefolder"})
    # torchvision's reference ResNet recipe vs its EfficientNet(-V2) one (core/recipes.py says where from)
    assert (resnet["schedule"], resnet["step_size"], resnet["lr"], resnet["weight_decay"], resnet["epochs"]) == \
        ("step", 30, 0.1, 1e-4, 90)
    assert (effnet["schedule"], effnet["warmup_epochs"], effnet["label_smoothing"], effnet["weight_decay"]) == \
        ("cosine", 5.0, 0.1, 2e-5)
    assert (resnet["image_size"], resnet["small_input"]) == (224, False)
    cifar = resolve({"model": "resnet18", "dataset": "cifar10"})
    assert (cifar["image_size"], cifar["small_input"], cifar["epochs"], cifar["lr"]) == (32, True, 200, 0.1)
    # another recipe than the data set's, by name
    assert resolve({"dataset": "synthetic", "recipe": "cifar"})["batch_size"] == 128


def test_resolving_twice_changes_nothing():
    once = TrainConfig.from_dict({"dataset": "synthetic", "rank": 4}).to_dict()
    assert TrainConfig.from_dict(once).to_dict() == once
    assert resolve(once) == once


def test_the_job_spec_stores_the_resolved_values_and_the_recipe_name():
    spec = TrainSpec.model_validate({"model": "resnet18", "dataset": "digits", "rank_ratio": 0.25, "lr": 0.03})
    dumped = spec.model_dump(mode="json")
    assert dumped["recipe"] == "digits" and dumped["lr"] == 0.03
    assert {k: dumped[k] for k in RECIPE_FIELDS if k != "lr"} == {
        k: v for k, v in recipe_values("digits", "resnet18").items() if k in RECIPE_FIELDS and k != "lr"}
    assert (dumped["image_size"], dumped["small_input"]) == (8, True)
    assert TrainSpec.model_validate(dumped).model_dump(mode="json") == dumped  # the spec alone reproduces the job


def test_a_recipe_value_that_does_not_fit_says_it_came_from_the_recipe():
    with pytest.raises(ValueError, match=r"image_size: cifar10 images are 32 px, got 8 \(the value of recipe 'digits'\)"):
        TrainConfig.from_dict({"dataset": "cifar10", "recipe": "digits", "rank": 4})
    with pytest.raises(ValueError, match="recipe must be one of digits, synthetic, cifar, imagenet, got 'mnist'"):
        TrainConfig.from_dict({"recipe": "mnist", "rank": 4})


def test_lowrank_recipes_lists_them(capsys):
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["recipe"], r["models"]) for r in rows] == [
        ("digits", "all"), ("synthetic", "all"), ("cifar", "all"), ("imagenet", "efficientnet*"), ("imagenet", "resnet*")]
    assert rows[0]["values"] == recipe_values("digits", "resnet18") and rows[0]["datasets"] == ["digits"]
    assert all(r["source"] for r in rows)
    assert main(["recipes"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["recipe", "models", "default", "for", "epochs"]
    digits = table[1].split()
    assert digits[:6] == ["digits", "all", "digits", "3", "64", "0.02"]


def test_lowrank_train_recipe_flag_and_no_flags(capsys):
    """--recipe picks a recipe; --no-nesterov overrides a recipe's True; the resolved config is in the summary."""
    argv = ["train", "--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-val-size", "16",
            "--image-size", "16", "--no-small-input", "--init", "dense", "--recipe", "digits", "--epochs", "1",
            "--batch-size", "16", "--no-nesterov", "--device", "cpu", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    config = json.loads(captured.out)["config"]
    assert (config["recipe"], config["lr"], config["nesterov"], config["small_input"]) == ("digits", 0.02, False, False)
    assert "resnet18 on synthetic, recipe digits: epochs 1, batch_size 16, lr 0.02" in captured.err
