# The package's version. It must equal the C library's kvattn_version(): checked at import.
__version__ = "0.1.0"
