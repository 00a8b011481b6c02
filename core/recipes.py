"""Named training recipes: the optimizer, schedule and length a data set (and model family) trains well with.

A train config (core.train.TrainConfig) or job spec (jobs.specs.TrainSpec) names a recipe in its
`recipe` field, or leaves it out and gets its data set's (`default_recipe`). Every field a recipe
gives that the user left out (or set to null) takes the recipe's value; a field the user set wins.
`resolve` does this once, before validation, so a stored config or job spec holds the values that
ran and reproduces the run without this module (resolving it again changes nothing).

Torch-free: the API validates job specs with it. `lowrank recipes` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.names import DATASET_IMAGE_SIZE, DATASETS, DEFAULT_DATASET, DEFAULT_MODEL, MODELS, model_family

# What every recipe gives (core.train_fields marks these fields "from the recipe").
RECIPE_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov", "weight_decay", "schedule",
                 "warmup_epochs", "label_smoothing")
# What a recipe may give; a field left out by both the user and the recipe takes this value.
OPTIONAL_FIELDS: dict[str, Any] = {"step_size": 30, "step_gamma": 0.1}
SMALL_INPUT_MAX_PX = 64  # images up to this size get the small-image stem unless small_input is set


@dataclass(frozen=True)
class Recipe:
    """`values` apply to every model; `family` adds or overrides values per model family (resnet, efficientnet)."""

    name: str
    datasets: tuple[str, ...]        # the data sets whose default recipe this is
    summary: str
    source: str                      # where the values come from
    values: dict[str, Any]
    family: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_model(self, model: str) -> dict[str, Any]:
        """The recipe's values for `model` (its family's overrides applied)."""
        return {**self.values, **self.family.get(model_family(model), {})}


# One SGD setting serves both small data sets: measured on digits (docs/results/train.md: every init
# and rank ratio 0.1-0.5 above 0.9 val top-1 in 3 epochs). A short linear warm-up keeps the first
# steps of a freshly factored network (NKP and spectral inits start with large weights) stable.
_SMALL_DATA = dict(batch_size=64, lr=0.02, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                   schedule="cosine", warmup_epochs=0.5, label_smoothing=0.0)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("digits", ("digits",), "scikit-learn's 8 x 8 digits, trained at their native 8 px",
           "measured here: bench/train.py, docs/results/train.md",
           dict(_SMALL_DATA, epochs=3, image_size=8)),
    Recipe("synthetic", ("synthetic",), "seeded synthetic images: smoke runs and throughput",
           "the digits recipe's optimizer (same scale of data); 2 epochs",
           dict(_SMALL_DATA, epochs=2)),
    Recipe("cifar", ("cifar10", "cifar100"), "CIFAR-10/100 at 32 px (small-image stem)",
           "kuangliu/pytorch-cifar main.py (ResNet-18 95.4% on CIFAR-10): SGD lr 0.1, momentum 0.9, "
           "weight decay 5e-4, batch 128, cosine over 200 epochs",
           dict(epochs=200, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9, nesterov=False,
                weight_decay=5e-4, schedule="cosine", warmup_epochs=0.0, label_smoothing=0.0)),
    Recipe("imagenet", ("imagefolder",), "ImageNet-style folders at 224 px; per model family",
           "torchvision references/classification README: ResNet = its default recipe (8 GPUs x batch 32 "
           "= 256, lr 0.1, momentum 0.9, wd 1e-4, 90 epochs, lr x0.1 every 30); EfficientNet B0-B3 have "
           "no torchvision recipe (weights ported from timm), so its EfficientNet-V2 recipe (SGD, 8 x 128 "
           "= 1024 at lr 0.5, cosine, 5 linear warm-up epochs, 600 epochs, label smoothing 0.1, wd 2e-5) "
           "at batch 256 with lr scaled linearly (0.125), as that README advises for another batch; its "
           "auto-augment, mixup/cutmix, random erasing, EMA, repeated-augment sampling and "
           "no-decay-on-norm have no counterpart here",
           dict(optimizer="sgd", momentum=0.9, nesterov=False),
           family={
               "resnet": dict(epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4, schedule="step",
                              step_size=30, step_gamma=0.1, warmup_epochs=0.0, label_smoothing=0.0),
               "efficientnet": dict(epochs=600, batch_size=256, lr=0.125, weight_decay=2e-5, schedule="cosine",
                                    warmup_epochs=5.0, label_smoothing=0.1),
           }),
)}
DEFAULT_RECIPE = {ds: r.name for r in RECIPES.values() for ds in r.datasets}
assert set(DEFAULT_RECIPE) == set(DATASETS), "every data set needs a default recipe"


def default_recipe(dataset: str) -> str:
    return DEFAULT_RECIPE[dataset]


def recipe_values(name: str, model: str) -> dict[str, Any]:
    """Every field the recipe `name` sets for `model`, with OPTIONAL_FIELDS' values where it sets none."""
    given = RECIPES[name].for_model(model)
    ordered = [*RECIPE_FIELDS, *OPTIONAL_FIELDS, *sorted(set(given) - set(RECIPE_FIELDS) - set(OPTIONAL_FIELDS))]
    return {k: given.get(k, OPTIONAL_FIELDS.get(k)) for k in ordered}


def resolve(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the train fields `values` with the recipe applied (see the module docstring).

    Fills `recipe` (the data set's when left out), every recipe field that is missing or None,
    `image_size` (the recipe's, else the data set's) and `small_input` (images <= 64 px get the
    small-image stem). Values it cannot resolve (an unknown data set, model or recipe) are left as
    they are for validation to name."""
    out = dict(values)
    dataset, model = out.get("dataset", DEFAULT_DATASET), out.get("model", DEFAULT_MODEL)
    if dataset not in DATASETS or model not in MODELS:
        return out
    if out.get("recipe") is None:
        out["recipe"] = default_recipe(dataset)
    if out["recipe"] not in RECIPES:
        return out
    given = recipe_values(out["recipe"], model)
    for key, value in given.items():
        if out.get(key) is None:
            out[key] = value
    if out.get("image_size") is None:
        out["image_size"] = DATASET_IMAGE_SIZE[dataset]
    if out.get("small_input") is None and isinstance(out["image_size"], int):
        out["small_input"] = out["image_size"] <= SMALL_INPUT_MAX_PX
    return out


def describe(name: str) -> list[dict[str, Any]]:
    """JSON-able rows for `lowrank recipes`: one per model family where the recipe differs by family."""
    recipe = RECIPES[name]
    families = sorted(recipe.family) or [None]
    rows = []
    for fam in families:
        model = next(m for m in MODELS if fam is None or model_family(m) == fam)
        rows.append({"recipe": name, "models": f"{fam}*" if fam else "all", "datasets": list(recipe.datasets),
                     "summary": recipe.summary, "source": recipe.source, "values": recipe_values(name, model)})
    return rows
