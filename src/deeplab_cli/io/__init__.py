"""Images in, results out: the inputs of a batch (`inputs`), decoding and resizing images (`images`),
and the atomic, resumable outputs (`outputs`)."""
