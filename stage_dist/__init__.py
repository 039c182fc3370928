"""stage_dist: distributed training and inference for STAGE on AVA, over a clip-ordered feature store.

Modules, one concept each:

- ``config``        typed settings dataclasses -> every command line, ``--config FILE``, config.json
- ``errors``        ``UserInputError`` and ``INPUT_ERRORS`` (what the CLIs report as one line), the exit codes
- ``cli``           ``Command``: how every command's main ends (one-line errors, exit codes, torchrun's summary)
- ``outputs``       output safety: never over an input or others' files, ownership markers, locks
- ``paths``         an OS error about a user's path (read-only, name length, space) as one line naming the flag
- ``fileio``        atomic file writes
- ``synth``         synthetic AVA-like dataset in both published layouts
- ``sources``       readers of the published I3D and SlowFast HDF5 layouts, with input validation
- ``schema``        the store's array names, dtypes, chunk and shard rules (no torch, no zarr)
- ``store``         the zarr v3 feature store: create/record/finish, ``FeatureStore`` (the reader API)
- ``zarr_io``       zarr v3 shard files read and written directly (no zarr-python call per read)
- ``convert``       parallel, resumable, verified conversion of sources into a store (and its CLI)
- ``shard_format``  the WebDataset tar form of a store: sample codec, writer, manifest, back to a store
- ``shard_stream``  streaming a split from tar shards: the shard path of the window-source contract
- ``shards``        the shards command line (store -> shards, ``--to-store``)
- ``window``        WindowSpec / Window / InferenceWindow and the one window cut (numpy only, no torch)
- ``batch``         Batch, ``collate`` (graph built on the host), ``Padding``
- ``window_source`` the ``WindowSource`` protocol (store or shards), ``InferenceBatch``, ``KeyframeNamer``
- ``sampler``       clip-aware distributed window sampler and epoch/step position; inference window plan
- ``loaders``       what both forms share for DataLoaders: the position-moving ``TrainLoader``, inference collate
- ``store_source``  the store path of the window-source contract (``StoreWindowSource``)
- ``data``          opening a split as a window source (store or shards), the training data
- ``split_config``  which split a command reads: a store or shards (exactly one), and how
- ``graph``         the banded spatio-temporal graph of a batch of windows, and attention over it
- ``model``         the STAGE graph-attention model, the no-graph baseline, the model kinds and the
                    model's config section (``ModelSection``), ``compile_model``
- ``saved_model``   the model's part of a checkpoint (either format; published weights' config), strict load
- ``precision``     AMP modes (bf16, fp16 with a grad scaler, off)
- ``lr_scaling``    the LR and warmup of an effective batch, why, and where it was measured
- ``lamb``          the LAMB optimizer (Adam with a layer-wise trust ratio), ``--optimizer lamb``
- ``checkpoint``    the one checkpoint module: its layout (``TrainingState``), typed ``Checkpoint`` of
                    either format, atomic saves, newest-complete fallback, RNG state, ``load_models``
- ``distributed``   the torchrun environment, process group, gathering to rank 0, threads, logging
- ``preemption``    preemption signals and ``--checkpoint-every-minutes``: when every rank stops or saves
- ``progress``      a tqdm bar on a terminal, one log line every N seconds in a log file
- ``nonfinite``     the trainer's non-finite guard (first bad step and window, no per-step host sync)
- ``trainlog``      rank 0's run log: config.json, TensorBoard, metrics.jsonl, progress bar, log lines
- ``train``         the torchrun trainer and its command line
- ``runlog``        ``OUTPUT_DIR/metrics.jsonl``: rank 0's resume-safe appender and its reader
- ``curves``        learning curves of runs from their metrics.jsonl (its command line)
- ``inference``     the inference library: ``predict`` over any window source, exactly once, batch-invariant
- ``infer``         the inference command line (input and output checks)
- ``ava``           AVA CSV / pbtxt reading and results.csv writing
- ``evaluate``      the official AVA frame-mAP@0.5, reproduced, on files or predictions in memory
- ``eval_stats``    video-bootstrap intervals, paired comparisons, runs of one model
- ``results_check`` ``evaluate --check``: every problem of a results.csv at once
- ``demo``          the end-to-end demo behind ``make demo``
"""

__version__ = "0.1.0"
