"""``unmix bench shards`` on a tiny tree: it runs, times both modes, and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_shards_small(tmp_path: Path, capsys):
    from unmix.cli import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "shards",
                "--images",
                "12",
                "--workers",
                "1",
                "--max-side",
                "100",
                "--dir",
                str(tmp_path / "w"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    rows = {(r["mode"], r["workers"]): r for r in res["results"]}
    assert set(rows) == {("copy", 1), ("reencode", 1)}
    assert rows["copy", 1]["encoded"] == {"copied": 12} and rows["reencode", 1]["encoded"] == {"resized": 12}
    assert all(
        r["images"] == 12 and r["images_per_s"] > 0 and r["cpu_ms_per_image"] >= 0 for r in rows.values()
    )
    assert res["command"].startswith("unmix bench shards --images 12")
    table = capsys.readouterr().out
    assert "copy" in table and "max100" in table and "images/s" in table


def test_cli_sample(tmp_path: Path, capsys):
    from unmix.cli import main

    assert main(["shards", "sample", "photos", str(tmp_path), "--images", "10", "--classes", "2", "-q"]) == 0
    assert "train 8 images" in capsys.readouterr().out
    assert main(["shards", "verify", str(tmp_path / "train")]) == 0
