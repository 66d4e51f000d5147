"""What every domain-restriction method shares: a model that maps images to class logits, and
its evaluation on each domain's test split.

Images handed to a ``DomainClassifier`` are float tensors [B, 3, H, W] in [0, 1] at the dataset's
resolution; each model does its own resizing and normalisation.

The protocol and the evaluation routines live in ``ipshield.models.evaluation`` (the models layer
uses them too); they are re-exported here under their old names.
"""

from __future__ import annotations

from ipshield.models.evaluation import DomainClassifier, Transform, accuracy, accuracy_by_domain, predict

__all__ = ["DomainClassifier", "Transform", "predict", "accuracy", "accuracy_by_domain"]
