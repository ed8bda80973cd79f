"""The MST-KDNet network (teacher and student share the class), its ViT bottleneck and the style discriminator."""

from mstkd.model.network import (
    STRIDE,
    MSTKDNet,
    NetOutput,
    StyleDiscriminator,
    build_discriminator,
    build_networks,
    count_parameters,
)

__all__ = [
    "STRIDE",
    "MSTKDNet",
    "NetOutput",
    "StyleDiscriminator",
    "build_discriminator",
    "build_networks",
    "count_parameters",
]
