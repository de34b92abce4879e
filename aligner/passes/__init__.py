"""Graph passes that rewrite decomposed patterns into standard ops (verified against the original)."""

from aligner.passes.layernorm import FuseResult, fuse_layernorm

PASSES = {"layernorm": fuse_layernorm}

__all__ = ["PASSES", "FuseResult", "fuse_layernorm"]
