"""What can be searched: DARTS candidate ops, the cell supernet, genotypes and the
discrete networks built from them. Pure torch, no training logic."""

from .darts import EdgeGroup, SearchCell, Supernet, derive_cell, num_edges, reduction_layers
from .genotype import Genotype, GenotypeError
from .network import Network
from .operations import OPS, PRIMITIVES, make_op

__all__ = [
    "OPS",
    "PRIMITIVES",
    "Genotype",
    "GenotypeError",
    "EdgeGroup",
    "Network",
    "SearchCell",
    "Supernet",
    "derive_cell",
    "make_op",
    "num_edges",
    "reduction_layers",
]
