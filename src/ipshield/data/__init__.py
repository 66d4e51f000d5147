"""Data: domains (a name, ordered class names, train/test splits), loaders, transforms."""

from ipshield.data.domain import Domain, ImageSplit, check_same_classes

__all__ = ["Domain", "ImageSplit", "check_same_classes"]
