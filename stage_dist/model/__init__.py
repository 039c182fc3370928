"""The STAGE graph-attention model, the no-graph baseline, their config section and kinds, and the
model's part of a checkpoint (either format).
"""
