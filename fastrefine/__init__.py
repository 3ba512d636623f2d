"""fastrefine: Label Refinery (Bagherinezhad et al., 2018) at fast-ImageNet-training speed."""

__version__ = "0.1.0"
