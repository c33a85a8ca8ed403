__version__ = "0.1.0"
#: Version of the on-disk store layout; bumped when a reader of an older
#: layout could misread a newer one. 2: each block's digest (``_digests``,
#: bound to the block and the store's ``store_id``) and the experiment claim
#: file. Format-1 stores still open, verify and fit (without digests).
FORMAT_VERSION = 2
