#!/bin/sh
# Let the nginx workers (group GROUP, default www-data) read the blob files of a
# buffyfs cache, and nothing else of it.
#
#   blob-access.sh /var/cache/buffyfs [www-data]
#
# The cache and blobs/ directories become group-traversable (x, no r: nothing can
# be listed), the 256 blob shard directories blobs/00 ... blobs/ff are made now the
# same way (buffyfs makes a missing one private, 0700), and blob files are read-only
# for everyone already (0444). index/ (header values, tokens of sources) and partial/
# stay 0700: the group cannot even look inside. Run it as the cache's owner, or root.
set -eu
cache=${1:?usage: blob-access.sh CACHE_DIR [GROUP]}
group=${2:-www-data}
[ -d "$cache/blobs" ] || { echo "no buffyfs cache in $cache" >&2; exit 2; }
owner=$(stat -c %u "$cache")
for d in "$cache" "$cache/blobs"; do
    chgrp "$group" "$d"
    chmod 0710 "$d"
done
for hi in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
    for lo in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
        d="$cache/blobs/$hi$lo"
        [ -d "$d" ] || mkdir "$d"
        chown "$owner:$group" "$d"
        chmod 0710 "$d"
    done
done
chmod 0700 "$cache/index" "$cache/partial"
