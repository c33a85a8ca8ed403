"""``coar-dask config``: the packaged defaults printed or written, only on request."""

from __future__ import annotations

import dask.config
import yaml

from coar_dask.cli.main import main
from coar_dask.config import DEFAULTS_FILE, user_config_path


def test_config_prints_the_commented_defaults(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert out == DEFAULTS_FILE.read_text()
    assert "coar-dask" in yaml.safe_load(out)


def test_config_write_puts_the_defaults_in_dasks_folder_and_keeps_an_edited_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dask.config, "PATH", str(tmp_path / "dask"))
    target = user_config_path()
    assert not target.exists()
    assert main(["config", "--write"]) == 0
    assert target.read_text() == DEFAULTS_FILE.read_text()
    assert str(target) in capsys.readouterr().out
    target.write_text("# mine\n")
    assert main(["config", "--write"]) == 0
    assert target.read_text() == "# mine\n" and "--force" in capsys.readouterr().out
    assert main(["config", "--write", "--force"]) == 0
    assert target.read_text() == DEFAULTS_FILE.read_text()


def test_config_write_to_a_path(tmp_path, capsys):
    path = tmp_path / "sub" / "coar.yaml"
    assert main(["config", "--write", str(path)]) == 0
    assert path.read_text() == DEFAULTS_FILE.read_text()


def test_config_flags_that_do_not_fit_are_one_line_errors(capsys):
    assert main(["config", "--example"]) == 2
    assert main(["config", "slurm", "--write", "x.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("coar-dask config: error: ") for line in err)
