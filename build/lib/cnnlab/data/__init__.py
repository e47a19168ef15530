"""Datasets, on-disk readers, validation split and batch loaders."""
