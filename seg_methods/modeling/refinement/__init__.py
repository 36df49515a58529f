"""Mask-refinement networks (CRM: continuous refinement of a coarse mask at any resolution)."""

from .crm import (  # noqa: F401
    CRMFusion,
    CRMNet,
    ImplicitDecoder,
    axis_coords,
    cascade_refine,
    ensemble_weights,
    make_coord,
    query_chunked,
    query_grid,
)
