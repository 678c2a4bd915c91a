"""`FolderSource` at scale: peak RSS and time to the first sentence for folders of N tiny images, each in a fresh
process (the first run builds the folder index, the second reuses it).

python -m bench.folder_scale --images 100000 200000 [--per-sentence 1] [--verify 1000] [--where /tmp]

The folders (identical 8x8 PNGs: the cost measured is listing, indexing and memory, not decoding) are made under
`--where` and deleted afterwards. Prints one JSON line per run: images, run, seconds to the first sentence,
peak RSS and its growth over the imports alone.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

CHILD = r"""
import json, resource, sys, time
from datamodules import FolderSource, VisualSentenceDataModule
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
verify = {"true": True, "false": False}.get(sys.argv[2].lower()) if not sys.argv[2].isdigit() else int(sys.argv[2])
dm = VisualSentenceDataModule(FolderSource(sys.argv[1], verify=verify), image_size=8, unit="image")
item = dm.dataset("train")[0]
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
growth = round((peak - base) / 1024)
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1024), "growth_mb": growth}))
"""


def make_folder(root: Path, images: int, per_sentence: int) -> None:
    """`images` identical 8x8 PNGs: loose in `root` (per_sentence 1) or `per_sentence` to a sentence folder."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 200)).save(buf, format="PNG")
    data = buf.getvalue()
    for k in range(images):
        if per_sentence == 1:
            (root / f"{k:08d}.png").write_bytes(data)
            continue
        folder = root / f"s{k // per_sentence:07d}"
        if k % per_sentence == 0:
            folder.mkdir()
        (folder / f"{k % per_sentence}.png").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100_000, 200_000])
    parser.add_argument("--per-sentence", type=int, default=1)
    parser.add_argument("--verify", default="1000", help="true, false or a number of sampled images")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--where", default=tempfile.gettempdir())
    args = parser.parse_args()
    for n in args.images:
        root = Path(tempfile.mkdtemp(prefix="folder-scale-", dir=args.where))
        try:
            make_folder(root, n, args.per_sentence)
            for run in range(1, args.runs + 1):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(root), args.verify], capture_output=True, text=True, check=True
                ).stdout.splitlines()[-1]
                print(json.dumps({"images": n, "per_sentence": args.per_sentence, "run": run, **json.loads(out)}))
        finally:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
