"""buffyfs: registered URLs as plain files, served from a local versioned cache."""

__version__ = "0.1.0"
