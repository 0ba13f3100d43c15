"""What is kept: the LMDB index and its records, the blob store, the cache
as a whole, the rules of control commands, collection, checks, scrub,
validation, @status and @metrics, unpacked (derived) data. Imports only
the leaves at the top (errors, options, control, safeio, priority, crash)."""
