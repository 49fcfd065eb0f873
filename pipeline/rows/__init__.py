"""The row cache: shard store (`store`), read → map → write runner (`runner`), decode workers
(`reader`), atomic writes (`atomic`), file digests (`digest`), and the row key (`key`)."""
