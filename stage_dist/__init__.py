"""stage_dist: distributed training and inference for STAGE on AVA, over a clip-ordered feature store.

Modules, one concept each:

- ``synth``      synthetic AVA-like dataset in both published layouts
- ``sources``    readers of the published I3D and SlowFast HDF5 layouts, with input validation
- ``store``      the zarr v3 feature store: schema, writer primitives, reader API
- ``convert``    parallel, resumable, verified conversion of sources into a store
- ``batch``      WindowSpec / Window / Batch: the data contract between store, sampler and model
- ``graph``      edge mask and weights of a batch of windows
- ``model``      the STAGE graph-attention model and the no-graph baseline
- ``sampler``    clip-aware distributed window samplers for training and inference
- ``data``       Dataset and DataLoader over a store
- ``checkpoint`` atomic, resumable checkpoints; published-checkpoint loading
- ``train``      the torchrun trainer
- ``infer``      distributed inference to one results.csv
- ``ava``        AVA CSV / pbtxt reading and writing
- ``evaluate``   the official AVA frame-mAP@0.5, reproduced
"""

__version__ = "0.1.0"
