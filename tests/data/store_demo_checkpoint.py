"""Store a demo run's ``best.pt`` as ``tests/data/demo-best.pt``, its weights in float16 (half the size).

python tests/data/store_demo_checkpoint.py runs/demo/<time>/best.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mstkd.atomic import atomic_path
from mstkd.checkpoint import checkpoint_geometry, load_checkpoint

TARGET = Path(__file__).with_name("demo-best.pt")


def main(source: str) -> None:
    _, _, payload = load_checkpoint(source)  # refuses anything that is not a checkpoint of this version
    if checkpoint_geometry(payload) is None:
        sys.exit(f"{source}: stores no target geometry; run the demo with this version first")
    payload["student"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["student"].items()}
    with atomic_path(TARGET) as tmp:
        torch.save(payload, tmp)
    print(f"wrote {TARGET} ({TARGET.stat().st_size / 1e6:.1f} MB, geometry {payload['geometry']})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
