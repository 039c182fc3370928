"""From a store (or tar shards) to model input: which split to read, window sources over a store or
over tar shards, clip-aware samplers, DataLoaders, batches and their graph.
"""
