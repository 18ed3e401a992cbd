"""The ``mergekit-like`` command line: thin commands over the library."""
