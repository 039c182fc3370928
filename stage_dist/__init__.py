"""stage_dist: distributed training and inference for STAGE on AVA, over a clip-ordered feature store.

Modules, one concept each:

- ``synth``      synthetic AVA-like dataset in both published layouts
- ``sources``    readers of the published I3D and SlowFast HDF5 layouts, with input validation
- ``store``      the zarr v3 feature store: schema, writer primitives, reader API
- ``convert``    parallel, resumable, verified conversion of sources into a store
- ``shards``     the WebDataset (tar shard) form of a store: writer and streaming reader
- ``batch``      WindowSpec / Window / Batch: the data contract between store, sampler and model
- ``graph``      edge mask and weights of a batch of windows
- ``model``      the STAGE graph-attention model and the no-graph baseline
- ``sampler``    clip-aware distributed window samplers for training and inference
- ``data``       DataLoaders over a store or shards
- ``precision``  AMP modes (bf16, fp16 with a grad scaler, off)
- ``distributed`` the torchrun environment, gathering to rank 0, per-rank threads and logging
- ``checkpoint`` atomic, resumable checkpoints with the newest-complete fallback
- ``fileio``     atomic file writes
- ``train``      the torchrun trainer
- ``infer``      distributed inference to one results.csv
- ``ava``        AVA CSV / pbtxt reading and writing
- ``evaluate``   the official AVA frame-mAP@0.5, reproduced
- ``demo``       the end-to-end demo behind ``make demo``
"""

__version__ = "0.1.0"
