"""The FUSE view of the cache: the tree (inodes and names, no pyfuse3), the
thin handlers over it, the @unpacked tree, link counts and snapshots of the
generated files. Imports fetch/ and store/, never http/."""
