"""The feature store on disk: its schema, zarr v3 shard files, the FeatureStore reader, windows,
and the WebDataset tar form of a store. No torch.
"""
