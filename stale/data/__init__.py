"""Data: the embedded synthetic dataset, mp4 I/O, and the WebDataset DataModule."""
