"""Convert + publish against convert alone and convert-then-upload, on the 6.3 GiB slice of gemma-4-31B-it.

    python bench/publish.py [--dir /tmp/convert-fp8-publish-bench] [--max-shard-size 1GB] [--rate BYTES_PER_S]
                            [--reps 2]

The Hub is the stand-in of the tests (tests/fake_hub_upload.py, LFS path: HF_HUB_DISABLE_XET=1), in this process,
its upload bandwidth capped at the disk's write rate (measured first: 2 GiB written and fsynced, unless --rate);
it hashes nothing (`check_sha=False`), as the real Hub's CPU is not this machine's. Three runs, each from a cold
page cache where this machine lets us drop it, each to a fresh stand-in, alternated --reps times:
- convert alone;
- convert, then `HfApi().upload_folder` of the output (what `hf upload` does), in sequence;
- convert with `--push-to-hub` (shards uploaded while the next ones are converted, then one commit).
--max-shard-size makes several shards of the 4.8 GB output (one shard could not overlap anything).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import drop_caches  # noqa: E402
from tests.fake_hub_upload import UploadHub  # noqa: E402


def disk_write_rate(folder: Path, nbytes: int = 2 * 2**30) -> float:
    """Bytes per second of a 2 GiB sequential write, fsynced."""
    path = folder / "rate.bin"
    block = os.urandom(16 * 2**20)
    started = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    rate = nbytes / (time.monotonic() - started)
    path.unlink()
    return rate


def env_for(hub: UploadHub) -> dict:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_write", HF_HUB_DISABLE_XET="1",
               CONVERT_FP8_NO_PROGRESS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("HF_HUB_OFFLINE", None)
    return env


def convert_cmd(src: Path, dst: Path, shard_size: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "converter.cli", "--src", str(src), "--dst", str(dst), "--max-shard-size",
            shard_size, "-q", *extra]


def timed(cmd: list[str], env: dict) -> float:
    started = time.monotonic()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


UPLOAD = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[1], exist_ok=True)
api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], commit_message="upload")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert-fp8-publish-bench"))
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--rate", type=float, default=None, help="upload bandwidth in bytes/s [the disk's]")
    parser.add_argument("--reps", type=int, default=2, help="alternated runs of each of the three")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    src, out = args.dir / "slice", args.dir / "out"
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, "bench/make_slice.py", str(src)], check=True, cwd=ROOT)
    rate = args.rate or disk_write_rate(args.dir)
    cold = drop_caches()
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    runs: dict[str, list[str]] = {"convert alone": [], "convert, then upload_folder": [], "convert --push-to-hub": []}
    best: dict[str, float] = {}
    shards = out_bytes = 0
    for _ in range(args.reps):  # the three alternated, so that a busy spell of the machine hits each alike
        shutil.rmtree(out, ignore_errors=True)
        drop_caches()
        with UploadHub(upload_rate=rate, check_sha=False) as hub:
            alone = timed(convert_cmd(src, out, args.max_shard_size), env_for(hub))
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        shards = len(list(out.glob("*.safetensors")))
        runs["convert alone"].append(f"{alone:.1f} s")
        best["convert alone"] = min(best.get("convert alone", alone), alone)

        shutil.rmtree(out, ignore_errors=True)
        drop_caches()
        with UploadHub(upload_rate=rate, check_sha=False) as hub:
            env = env_for(hub)
            conv = timed(convert_cmd(src, out, args.max_shard_size), env)
            up = timed([sys.executable, "-c", UPLOAD, "acme/slice-FP8", str(out)], env)
            assert len(hub.stored) == shards
        runs["convert, then upload_folder"].append(f"{conv + up:.1f} s ({conv:.1f} + {up:.1f})")
        best["convert, then upload_folder"] = min(best.get("convert, then upload_folder", conv + up), conv + up)

        shutil.rmtree(out, ignore_errors=True)
        drop_caches()
        with UploadHub(upload_rate=rate, check_sha=False) as hub:
            both = timed(convert_cmd(src, out, args.max_shard_size, "--push-to-hub", "acme/slice-FP8"), env_for(hub))
            assert len(hub.stored) == shards and len(hub.commits) == 2
        runs["convert --push-to-hub"].append(f"{both:.1f} s")
        best["convert --push-to-hub"] = min(best.get("convert --push-to-hub", both), both)
    shutil.rmtree(out, ignore_errors=True)

    print(f"source {src_bytes / 2**30:.2f} GiB BF16, output {out_bytes / 1e9:.2f} GB FP8 in {shards} shards "
          f"(--max-shard-size {args.max_shard_size}); upload capped at {rate / 1e6:.0f} MB/s "
          f"({'the disk write rate, measured' if not args.rate else '--rate'}), so the upload alone takes "
          f"{out_bytes / rate:.1f} s; {'cold' if cold else 'warm'} page cache; {os.cpu_count()} CPUs; "
          f"{args.reps} alternated runs each")
    print("| run | best wall | every run |")
    print("| --- | --- | --- |")
    for label, texts in runs.items():
        print(f"| {label} | {best[label]:.1f} s | {' / '.join(texts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
