"""buffyfs: registered URLs as plain files, served from a local versioned cache.

Layout (scripts/relayout.py writes this part from its table). Imports flow one way: the
faces (cli, daemon, mount, mountctl, mounttable, watchdog, busy) import the rooms; fs/
and http/ (the two views of the cache, FUSE and HTTP) import fetch/ and store/; fetch/
imports store/; every room may import the leaves at the top (errors, options, config,
control, log, crash, safeio), which import only each other.

    top      cli, daemon, mount, mountctl, mounttable, watchdog, busy
    http/    the server (its own modules)
    fs/      handlers, tree, unpackfs, links, snapshots
    fetch/   downloader, httplog, parallel, ranges, segments, streaming, refresh,
             scheduler, policy, upstream, replica
    store/   index, blobs, cache, commands, gc, check, scrub, status, metrics, unpack,
             unpacker, validate, revalidate, writes
"""

__version__ = "0.1.0"
