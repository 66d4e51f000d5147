"""Data: domains (a name, ordered class names, train/test splits), loaders, transforms."""

from ipshield.data.domain import Domain, ImageSplit, check_same_classes
from ipshield.data.synthetic import DIGIT_CLASSES, STYLES, caption, load_synthetic, make_domain
from ipshield.data.digits import digits_root, load_digits
from ipshield.data.folders import load_image_folders, read_image
from ipshield.data.sources import load_domains
from ipshield.data.preview import preview_grid

__all__ = [
    "Domain", "ImageSplit", "check_same_classes",
    "DIGIT_CLASSES", "STYLES", "caption", "load_synthetic", "make_domain",
    "digits_root", "load_digits", "load_image_folders", "read_image", "load_domains", "preview_grid",
]
