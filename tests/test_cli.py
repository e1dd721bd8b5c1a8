"""The `percausal` command line: wiring, the generate demo path, and one-line errors with exit code 2."""

import subprocess
import sys

from percausal_jax import cli


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "percausal_jax", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.SUBCOMMANDS:
        assert name in out.stdout


def test_generate_embedded(smollm2_dir, capsys):
    assert cli.main(["generate", "--model", str(smollm2_dir), "--prompt", "What is the capital of France?",
                     "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "completion: The capital of France is Paris" in out


def test_missing_model_dir_is_one_line_exit_2(tmp_path, capsys):
    rc = cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "no such model directory" in err and "missing" in err


def test_convert_gguf_missing_file(tmp_path, capsys):
    assert cli.main(["convert-gguf", "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
