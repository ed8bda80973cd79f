"""Synthetic BraTS-like phantom cases and federations, built offline from the MNI152 template.

Anatomy comes from the ICBM 2009a templates bundled with nilearn (brain mask, grey- and
white-matter probability maps; CSF = clip(brain - GM - WM, 0, 1)), so nothing is downloaded.
Cite Fonov et al. 2009/2011 and Collins et al. 1999 when publishing images made from them.

Geometry. Every phantom lives in the BraTS field of view of 240 x 240 x 155 mm. A grid of
shape ``(H, W, D)`` has voxels of ``(240/H, 240/W, 155/D)`` mm, stored in the BraTS voxel
order (first axis towards the subject's left, second towards posterior, third superior),
with the affine ``diag(-sx, -sy, sz)``; each voxel centre is the centre of its footprint on
the 1 mm BraTS grid, whose voxel (0, 0, 0) lies at world (0, 239, 0) mm (DATA.md §3), so
on the 240 x 240 x 155 grid the affine is exactly the BraTS header. The brain is centred in x
and y and fills the 155 mm in z, as in the BraTS data.

Recipe (DATA.md §8.2; lengths in mm, i.e. in voxels of the 240 x 240 x 155 grid, so that a
coarser grid gets proportionally sized tumours):

* per case, the anatomy is scaled by 0.93-1.07 (and 0.97-1.03 more per axis) about the
  brain centre and shifted by up to 3 mm, then a mass effect pushes the tissue around the
  tumour outwards by 20-45 % of the tumour-core radius;
* the tumour grows from a white-matter voxel (P(WM) > 0.8) in the supratentorial brain: an
  anisotropic distance field (axis scales 0.7-1.3) perturbed by smooth noise (sigma 4 mm,
  amplitude 2.5 mm) is cut by nested thresholds into a necrotic core (radius 5-10 mm), an
  enhancing rim (a further 3-6 mm) and edema (a further 8-20 mm), all multiplied by a
  per-case size factor from :attr:`SiteStyle.tumour_size`; edema stays where P(WM) > 0.3
  or close to the rim; nothing leaves the brain;
* each contrast mixes the tissue intensities of :data:`TISSUE_INTENSITY` and overwrites the
  tumour with :data:`TUMOUR_INTENSITY`, then applies the site's gamma, a smooth
  multiplicative bias field exp(b * n) (n: unit-SD noise smoothed with sigma 30 mm),
  Gaussian noise, skull-stripping and the site's intensity scale times 1000.

Label maps use the abstract values 1 = necrosis, 2 = edema, 3 = enhancing; files get the
convention of their layout (``fets``: 1/2/4, ``brats2023``: 1/2/3).

The package is split by stage, each module importing only the ones above it:

* :mod:`~mstkd.phantoms.recipe`: the knobs above, :class:`SiteStyle`, :func:`site_style`, the grid geometry;
* :mod:`~mstkd.phantoms.anatomy`: the template maps on a grid, the per-case deformation, the mass effect;
* :mod:`~mstkd.phantoms.tumour`: the tumour's seed, geometry and soft layers;
* :mod:`~mstkd.phantoms.case`: :func:`make_case`, which combines them into a :class:`PhantomCase`;
* :mod:`~mstkd.phantoms.federation`: :func:`write_federation`, cases over sites and files on disk, and
  :func:`ensure_phantoms`, which writes a federation once per set of parameters (safe across processes);
* :mod:`~mstkd.phantoms.preview`: :func:`preview`, one slice of a written case as a PNG.
"""

from mstkd.phantoms.case import PhantomCase, make_case
from mstkd.phantoms.federation import ensure_phantoms, write_federation
from mstkd.phantoms.preview import preview
from mstkd.phantoms.recipe import (
    EDEMA,
    ENHANCING,
    FOV_MM,
    INTENSITY_SCALE,
    MAX_CASES,
    NECROSIS,
    TISSUE_INTENSITY,
    TUMOUR_INTENSITY,
    SiteStyle,
    phantom_affine,
    site_style,
)

__all__ = [
    "EDEMA",
    "ENHANCING",
    "FOV_MM",
    "INTENSITY_SCALE",
    "MAX_CASES",
    "NECROSIS",
    "TISSUE_INTENSITY",
    "TUMOUR_INTENSITY",
    "PhantomCase",
    "SiteStyle",
    "ensure_phantoms",
    "make_case",
    "phantom_affine",
    "preview",
    "site_style",
    "write_federation",
]
