"""``unmix linear --backbone FILE`` with a file that is not a backbone: what is wrong, in words."""

from __future__ import annotations

from unmix.cli import main


def test_text_file_as_backbone_says_what_it_is(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("ideas for the next run\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # a torch.save zip cut short
    for path, words in (  # `in err`: the line ends with (RuntimeError) etc. where torch names the fault
        (notes, "not written by torch.save (it starts with b'ideas fo')"),
        (tmp_path / "empty.pt", "the file is empty"),
        (
            tmp_path / "cut.pt",
            "a torch.save zip archive (64 bytes) that cannot be loaded, truncated or damaged",
        ),
    ):
        args = ["linear", "--backbone", str(path), "--train", str(tmp_path), "--val", str(tmp_path)]
        assert main([*args, "--no-mlflow", "device=cpu"]) == 2
        err = capsys.readouterr().err
        assert f"unmix linear: error: {path}: not a readable backbone file: {words}" in err, err
        assert "(105)" not in err
