__version__ = "0.1.0"
#: Version of the on-disk store layout; bumped when a reader of an older
#: layout could misread a newer one. 2: each block's digest (``_digests``,
#: bound to the block and the store's ``store_id``) and the experiment claim
#: file. Format-1 stores still open, verify and fit (without digests).
#: Codecs are not part of the format: each array's zarr metadata names its
#: chain, and stores record theirs under ``codecs`` (issue 16: bit-shuffled
#: masks); a format-2 reader decodes either chain, so no bump. 3: the claim
#: gives the store its id, and block digests written after it are bound to
#: that id and the claimed experiment (a format-2 reader would take every such
#: block for a corrupt one); format-2 stores open, verify and fit unchanged.
#: 4: the claim and content record live in ``_completed/`` (out of zarr's
#: hierarchy), every array names its dimensions and the store holds xarray
#: coordinates (a format-3 reader would miss the claim and take every block for
#: a corrupt one); format 1-3 stores open, verify, build and fit unchanged.
FORMAT_VERSION = 4
