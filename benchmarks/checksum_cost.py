"""What the integrity checks cost: saving and loading a dictionary, and reading a cache shard, with
and without the sha256 / CRC-32 checks, side by side in one process on the same files.

    .venv/bin/python benchmarks/checksum_cost.py                     # D=2304, F=16384 (302 MB of fp32)
    .venv/bin/python benchmarks/checksum_cost.py --dim 576 --dict-size 4608 --repeat 5

The unchecked column is plain `torch.save`/`torch.load`/`load_file`, what the reference does. Each figure is the fastest
of `--repeat` alternating runs, files warm in the page cache (a cold read from disk would add the
same time to both sides, so these ratios are the worst case for the checks).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dictionary_learning import AutoEncoder, load_dictionary, save_dictionary
from dictionary_learning.cache import read_shard
from dictionary_learning.checkpoint import load_state_dict_file
from dictionary_learning.safe_io import sha256_file


def fastest(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cache_pass(tmp: Path, shard: dict, step_s: float, repeat: int) -> tuple[float, float, float]:
    """Seconds for one epoch over a 4-shard cache, with a training step of `step_s` after each batch
    of 4096 rows, without and with the shards' sha256 (which ActivationCache checks a shard ahead)."""
    import json
    import shutil

    from dictionary_learning.cache import FORMAT, MANIFEST, ActivationCache

    folder = tmp / "cache"
    folder.mkdir()
    entries = []
    for i in range(4):
        shutil.copy(tmp / "shard.safetensors", folder / f"shard_{i:05d}.safetensors")
        n = shard["x"].shape[0]
        entries.append({"file": f"shard_{i:05d}.safetensors", "n_tokens": n})
    manifest = dict(
        format=FORMAT, model="m", sites=[{"name": "x", "d": shard["x"].shape[1]}], io="out", dtype="float32",
        ctx_len=128, n_tokens=4 * n, documents_read=0, shards=entries, norms={}, complete=True,
    )  # fmt: skip

    digests = [sha256_file(folder / e["file"]) for e in entries]

    def epoch(checked: bool) -> None:
        listed = [dict(e, sha256=d) if checked else e for e, d in zip(entries, digests)]
        (folder / MANIFEST).write_text(json.dumps(dict(manifest, shards=listed)))
        for _ in ActivationCache(folder, batch_size=4096):
            time.sleep(step_s)

    size = sum((folder / e["file"]).stat().st_size for e in entries) / 1e6
    times = {True: float("inf"), False: float("inf")}
    for _ in range(repeat):
        for checked in (False, True):
            start = time.perf_counter()
            epoch(checked)
            times[checked] = min(times[checked], time.perf_counter() - start)
    return times[False], times[True], size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--shard-rows", type=int, default=65536, help="rows of the cache shard (width --dim)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--step-s", type=float, default=0.05, help="simulated training step in the cache pass")
    a = parser.parse_args()
    torch.manual_seed(0)
    ae = AutoEncoder(a.dim, a.dict_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, ours = tmp / "plain" / "ae.pt", tmp / "ours"
        plain.parent.mkdir()
        save_plain = fastest(lambda: torch.save(ae.state_dict(), plain), a.repeat)
        save_ours = fastest(lambda: save_dictionary(ae, ours), a.repeat)
        mb = plain.stat().st_size / 1e6
        rows.append(("save ae.pt (atomic, fsync, sha256)", mb, save_plain, save_ours))

        load_plain = fastest(lambda: torch.load(plain, weights_only=True), a.repeat)
        digest = {sha256_file(ours / "ae.pt")}
        load_sha = fastest(lambda: load_state_dict_file(ours / "ae.pt", digest), a.repeat)
        load_crc = fastest(lambda: load_state_dict_file(plain), a.repeat)
        rows.append(("read ae.pt, sha256 checked", mb, load_plain, load_sha))
        rows.append(("read ae.pt, CRC-32 checked (no sha256 recorded)", mb, load_plain, load_crc))
        whole = fastest(lambda: load_dictionary(ours), a.repeat)
        rows.append(("load_dictionary, whole (builds the module)", mb, load_plain, whole))
        sha = fastest(lambda: sha256_file(plain), a.repeat)

        shard = {"x": torch.randn(a.shard_rows, a.dim), "tokens": torch.zeros(a.shard_rows, dtype=torch.int32)}
        save_file(shard, str(tmp / "shard.safetensors"))
        entry = {"file": "shard.safetensors", "sha256": sha256_file(tmp / "shard.safetensors")}
        shard_mb = (tmp / "shard.safetensors").stat().st_size / 1e6
        perm = torch.randperm(a.shard_rows)  # what the cache does with a shard: a shuffled copy

        read_plain = fastest(lambda: load_file(str(tmp / "shard.safetensors"))["x"][perm], a.repeat)
        read_ours = fastest(lambda: read_shard(tmp, entry)["x"][perm], a.repeat)
        rows.append(("read + shuffle a cache shard, sha256 checked", shard_mb, read_plain, read_ours))

        pass_plain, pass_ours, pass_mb = cache_pass(tmp, shard, a.step_s, a.repeat)
        name = f"a cache epoch, {a.step_s * 1000:.0f} ms per step, checked ahead"
        rows.append((name, pass_mb, pass_plain, pass_ours))

    print(f"D={a.dim} F={a.dict_size}; sha256 alone: {mb / sha:.0f} MB/s; fastest of {a.repeat}")
    print(f"{'operation':48s} {'MB':>7s} {'unchecked s':>12s} {'checked s':>10s} {'ratio':>6s} {'MB/s':>7s}")
    for name, size, base, checked in rows:
        print(f"{name:48s} {size:7.0f} {base:12.3f} {checked:10.3f} {checked / base:6.2f} {size / checked:7.0f}")


if __name__ == "__main__":
    main()
