"""The names core/ registers, without torch: models, data sets, init and approximation methods.

core.models, core.data and core.approx build their registries from these tuples, and the service
(jobs/specs.py, which the API imports) and the CLI read them here, so a name exists everywhere or
nowhere. tests/core/test_names.py checks the torch-side registries against them.
"""
from __future__ import annotations

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101",
          "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")
DATASETS = ("imagefolder", "cifar10", "cifar100", "digits", "synthetic")
DEFAULT_MODEL, DEFAULT_DATASET = "resnet18", "digits"   # a train config's model and dataset when left out
INIT_METHODS = ("spectral", "rescale", "nkp", "random")          # how factors are initialized
APPROX_METHODS = INIT_METHODS + ("reference",)                   # core.approx.METHODS
# Compressing a trained network (MATH.md Section 8): core.layer_compress, core.allocation, core.compress.
COMPRESS_METHODS = ("spectral", "nkp", "whiten", "asvd", "nkp-data")
COMPRESS_DATA_METHODS = ("whiten", "asvd", "nkp-data")            # need the calibration second moment
ALLOCATIONS = ("uniform", "energy", "stable-rank", "greedy")      # rank allocation under a budget
REFINE_MODES = ("off", "independent", "sequential")               # layer-wise reconstruction inputs

# A data set's images are this many px on a side unless image_size says otherwise (cifar: always 32).
DATASET_IMAGE_SIZE = {"imagefolder": 224, "cifar10": 32, "cifar100": 32, "digits": 32, "synthetic": 32}
# Classes per data set; None: the data's own (imagefolder: its class folders; synthetic: num_classes or 10).
DATASET_CLASSES = {"imagefolder": None, "cifar10": 10, "cifar100": 100, "digits": 10, "synthetic": None}
SYNTHETIC_DEFAULT_CLASSES = 10
DIGITS_TRAIN_SIZE = 1437  # core.data's fixed 80/20 split of scikit-learn's 1797 digits


def model_family(model: str) -> str:
    """"resnet" or "efficientnet": the part of a model name that recipes and stems depend on."""
    return "efficientnet" if model.startswith("efficientnet") else "resnet"


def dataset_classes(dataset: str, num_classes: int | None) -> int | None:
    """The number of classes a run of `dataset` has, or None when only the data can tell (imagefolder)."""
    if dataset == "synthetic":
        return num_classes or SYNTHETIC_DEFAULT_CLASSES
    return DATASET_CLASSES.get(dataset) or num_classes
