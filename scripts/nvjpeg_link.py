"""Give nvImageCodec an nvJPEG library where it looks for one, on a GPU machine with no package index.

nvImageCodec's nvjpeg extension loads libnvjpeg.so.<CUDA major> through its RPATH (site-packages'
nvidia/cu<major>/lib, then /usr/local/cuda/lib64) or the loader's path. The nvidia-nvjpeg wheel (3.8 MB)
does not fit beside the other carried wheels, but torchvision's wheel bundles the same library under a
hashed name: when no nvJPEG is found, this links that copy into nvidia/cu<major>/lib. Prints what it used.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torchvision

    major = (torch.version.cuda or "0").split(".")[0]
    name = f"libnvjpeg.so.{major}"
    try:
        ctypes.CDLL(name)
        print(f"nvjpeg: {name} found by the loader")
        return
    except OSError:
        pass
    from nvidia import nvimgcodec

    site_lib = Path(nvimgcodec.__file__).resolve().parents[1] / f"cu{major}" / "lib"
    for folder in (site_lib, Path("/usr/local/cuda/lib64")):
        if (folder / name).exists():
            print(f"nvjpeg: {folder / name}")
            return
    bundled = sorted((Path(torchvision.__file__).parent.parent / "torchvision.libs").glob("libnvjpeg*.so*"))
    if not bundled:
        sys.exit(f"nvjpeg: no {name} and none bundled with torchvision: encoder.gpu_decoder=nvimgcodec cannot run")
    site_lib.mkdir(parents=True, exist_ok=True)
    (site_lib / name).symlink_to(bundled[0])
    print(f"nvjpeg: linked {site_lib / name} -> {bundled[0]}")


if __name__ == "__main__":
    main()
