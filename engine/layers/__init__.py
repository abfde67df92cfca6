"""Building blocks shared by the model families: norm, rope, MLA, the V3.2 indexer, MoE."""
