"""Models: the CLIP adapter (`ipshield.models.clip`), the small CLIP pretrained by the project
(`ipshield.models.tiny_clip`), random-weight test checkpoints (`ipshield.models.testing`) and the
small image classifiers (`ipshield.models.classifiers`).

Submodules are imported on demand so that ``import ipshield.models`` stays light.
"""
