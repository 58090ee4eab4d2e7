"""The README picture of detect() on real photos: docs/img/detect_group.png.

    python docs/make_detect_figure.py [--skimage_data DIR]

No group photo with a licence that allows shipping it is available offline, so the picture is
a collage of three real photographs that are free to reuse: Grace Hopper (US Navy, public
domain; bundled with matplotlib), astronaut Eileen Collins (NASA, public domain) and the
"camera" photo (CC0, Lav Varshney), both bundled with scikit-image (``pip install scikit-image``
or pass the folder of its ``skimage/data``).  One copy is rolled by 20 degrees.
"""

from __future__ import annotations

import argparse
import os

import matplotlib
from PIL import Image

import lgcn_jax
from lgcn_jax.draw import draw

HOPPER = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def collage(skimage_data: str) -> Image.Image:
    photos = [(Image.open(HOPPER), 0.72, (20, 40), 0), (Image.open(os.path.join(skimage_data, "astronaut.png")), 0.8, (400, 60), 0),
              (Image.open(os.path.join(skimage_data, "camera.png")), 0.8, (810, 40), 0), (Image.open(HOPPER), 0.42, (1240, 140), 20)]
    canvas = Image.new("RGB", (1500, 520), (235, 235, 235))
    for im, scale, (x, y), deg in photos:
        im = im.convert("RGB").resize((int(im.width * scale), int(im.height * scale)), Image.LANCZOS)
        if deg:
            mask = Image.new("L", im.size, 255).rotate(deg, expand=True)
            im = im.rotate(deg, resample=Image.BICUBIC, expand=True)
            canvas.paste(im, (x, y), mask)
        else:
            canvas.paste(im, (x, y))
    return canvas


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skimage_data", default=None, help="folder holding astronaut.png and camera.png (default: skimage.data's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "img", "detect_group.png"))
    args = p.parse_args(argv)
    folder = args.skimage_data
    if folder is None:
        import skimage.data

        folder = os.path.dirname(skimage.data.__file__)
    image = collage(folder)
    faces = lgcn_jax.detect(image, "300w_paper", refine=1)  # the paper network, two passes, as the figure shows
    print(f"{len(faces)} faces; mean confidence " + ", ".join(f"{f.confidence.mean():.2f}" for f in faces))
    draw(image, faces).save(args.out)
    return args.out


if __name__ == "__main__":
    main()
