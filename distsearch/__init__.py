"""distsearch: distributed search of robust neural architectures (DARTS, LeaSE, DSRNA)."""

__version__ = "0.1.0"
