"""Data for bitfast: BiT preprocessing, an ImageFolder reader, the embedded digits, loaders.

* :func:`load_digits`, :class:`DigitsDataset`: the UCI handwritten digits (shipped with the
  package, CC BY 4.0), upsampled and scaled for BiT networks: no download needed.
* :func:`train_transform`, :func:`eval_transform`, :func:`augment_tensor`: BiT's train and
  eval preprocessing (torch ops; Pillow only for PIL input).
* :class:`ImageFolder`: ``root/<class>/<image>`` trees (needs Pillow), corrupt files skipped.
* :func:`make_loader`, :func:`set_epoch`: deterministic, optionally distributed DataLoaders.
* :class:`StepSampler`, :class:`SeededDataset`: the same order addressed by training step
  (what the training loop uses; ``bitfast.data.sampling``).
"""

from bitfast.data import transforms
from bitfast.data.digits import DigitsDataset, load_digits, split_indices
from bitfast.data.folder import IMG_EXTENSIONS, ImageFolder
from bitfast.data.loader import EpochSampler, default_workers, make_loader, set_epoch
from bitfast.data.sampling import SeededDataset, StepSampler, epoch_permutation
from bitfast.data.transforms import augment_tensor, eval_transform, to_tensor, train_transform

__all__ = [
    "IMG_EXTENSIONS",
    "DigitsDataset",
    "EpochSampler",
    "ImageFolder",
    "SeededDataset",
    "StepSampler",
    "augment_tensor",
    "default_workers",
    "epoch_permutation",
    "eval_transform",
    "load_digits",
    "make_loader",
    "set_epoch",
    "split_indices",
    "to_tensor",
    "train_transform",
    "transforms",
]
