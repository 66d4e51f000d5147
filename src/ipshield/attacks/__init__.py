"""Attacks: on domain restriction (``ipshield.attacks.domain``) and on embedding watermarks (``ipshield.attacks.watermark``)."""
