__version__ = "0.1.0"
#: Version of the on-disk store layout; bumped when a reader of an older
#: layout could misread a newer one.
FORMAT_VERSION = 1
