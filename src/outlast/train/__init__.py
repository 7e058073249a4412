"""Reference trainer for outlast: a small byte-level transformer, a real text corpus
with an exactly resumable stream, packing of documents into micro-batches without
padding, and cost-balanced assignment of documents to data-parallel ranks. Every
piece here is plain PyTorch and needs neither a GPU nor the network; the training
loop that ties them to outlast's checkpoints lives beside them.
"""
