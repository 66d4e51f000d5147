"""Domain restriction: unprotected references (zero-shot CLIP, CoOp) and protections (IP-CLIP, MAP, NTL, CUTI-domain)."""
