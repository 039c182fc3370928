"""Getting features into a store: readers of the published HDF5 layouts, the parallel resumable
converter, synthetic datasets. No torch.
"""
