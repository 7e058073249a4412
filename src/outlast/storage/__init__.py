"""Where checkpoint bytes go: shard files on a local filesystem (``local``)."""
