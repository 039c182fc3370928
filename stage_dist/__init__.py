"""stage_dist: distributed training and inference for STAGE on AVA, over a clip-ordered feature store.

The package by role; imports point one way, commands -> engine -> model / data / ava -> ingest /
store -> core (``tests/test_imports.py`` holds it to that, and keeps core, store and ingest free
of torch). Data flows: published HDF5 -> ingest -> store -> data (windows, batches, graph) ->
model -> engine (training, inference) -> results.csv -> ava (evaluation).

Commands (a parser and ``main`` each; ``python -m stage_dist.<command>``):
``train``, ``infer``, ``convert`` (``tools/convert_features.py``), ``shards``, ``evaluate``,
``synth``, ``curves``, ``demo``.

``core/``    infrastructure every layer uses
    ``config``       typed settings dataclasses -> every command line, ``--config FILE``, config.json
    ``errors``       ``UserInputError``, ``INPUT_ERRORS`` (what a command reports as one line), the exit codes
    ``cli``          ``Command``: how every command's main ends (one-line errors, exit codes, torchrun's summary)
    ``outputs``      output safety: never over an input or others' files, ownership markers, locks
    ``paths``        an OS error about a user's path (read-only, name length, space) as one line naming the flag
    ``fileio``       atomic file writes
    ``progress``     a tqdm bar on a terminal, one log line every N seconds in a log file
``store/``   the feature store on disk (no torch)
    ``schema``        the store's array names, dtypes, chunk and shard rules, class set (no zarr)
    ``zarr_shards``   zarr v3 shard files read and written directly (no zarr-python call per read)
    ``feature_store`` create/record/finish a store, ``FeatureStore`` (the reader API)
    ``window``        ``WindowSpec`` / ``Window`` / ``InferenceWindow`` and the one window cut (numpy only)
    ``tar_shards``    the WebDataset tar form of a store: sample codec, writer, manifest, back to a store
``ingest/``  getting features into a store (no torch)
    ``published_hdf5`` readers of the published I3D and SlowFast HDF5 layouts, with input validation
    ``conversion``     parallel, resumable, verified conversion into a store (and its tar form)
    ``synthetic``      the synthetic AVA-like dataset in both published layouts
``data/``    from a split to model input
    ``split_config``  which split a command reads: a store or tar shards (exactly one), and how
    ``window_source`` the ``WindowSource`` protocol (store or shards), ``InferenceBatch``, ``KeyframeNamer``
    ``store_windows`` the store form of a window source (``StoreWindowSource``)
    ``tar_windows``   the tar-shard form of a window source (``TarWindowStream``, streaming)
    ``splits``        opening a split as a window source, the training data
    ``sampler``       clip-aware distributed window sampler, epoch/step position; inference window plan
    ``loaders``       what both forms share for DataLoaders: the position-moving ``TrainLoader``, inference collate
    ``batch``         ``Batch``, ``collate`` (the graph built on the host), ``Padding``
    ``graph``         the banded spatio-temporal graph of a batch of windows, and attention over it
``model/``   the network
    ``stage``         STAGE, the no-graph baseline, the model kinds, ``ModelSection``, ``compile_model``
    ``saved_model``   the model's part of a checkpoint (either format; published weights' config), strict load
``engine/``  running the model
    ``train_config``  the trainer's settings (``TrainConfig`` and its sections)
    ``trainer``       ``Trainer``: one run on one rank (DDP, AMP, exact resume, validation)
    ``checkpoint``    the one checkpoint module: layout (``TrainingState``), typed ``Checkpoint`` of either
                      format, atomic saves, newest-complete fallback, RNG state, ``load_models``
    ``nonfinite``     the trainer's non-finite guard (first bad step and window, no per-step host sync)
    ``preemption``    preemption signals and ``--checkpoint-every-minutes``: when every rank stops or saves
    ``run_log``       rank 0's run log: config.json, TensorBoard, metrics.jsonl, progress bar, log lines
    ``metrics_log``   ``OUTPUT_DIR/metrics.jsonl``: rank 0's resume-safe appender and its reader
    ``curves``        learning curves of runs from their metrics.jsonl
    ``distributed``   the torchrun environment, process group, gathering to rank 0, threads, logging
    ``precision``     AMP modes (bf16, fp16 with a grad scaler, off)
    ``lr_scaling``    the LR and warmup of an effective batch, why, and where it was measured
    ``lamb``          the LAMB optimizer (Adam with a layer-wise trust ratio), ``--optimizer lamb``
    ``inference``     ``predict`` over any window source: exactly once, batch-invariant, gathered
``ava/``     AVA's formats and evaluation
    ``formats``       AVA CSV / pbtxt reading and results.csv writing
    ``evaluation``    the official frame-mAP@0.5, reproduced, on files or predictions in memory; action groups
    ``statistics``    video-bootstrap intervals, paired comparisons, runs of one model
    ``results_check`` ``evaluate --check``: every problem of a results.csv at once
"""

__version__ = "0.1.0"
