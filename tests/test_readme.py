"""The README's Python programs run the way a user runs them: saved as a file, ``python file.py``.

A Dask LocalCluster's worker processes re-import the main script, so running
a block with ``exec`` in the test process would hide a missing
``if __name__ == "__main__":`` guard; a real script in a subprocess does not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
#: A block whose first line is ``# name.py ...`` is that file of the user's folder (e.g. their own module).
FILE_NAME = re.compile(r"# (\w+\.py)\b")
#: Blocks that need what a test machine does not have (say why); every other block must run.
NEEDS = {"cluster_client(\"slurm\"": "starts SLURM jobs for the user's own experiment and shared store"}


def user_files(folder: Path) -> None:
    """Write the README's named files (``# my_model.py`` blocks) into ``folder``, as a user saves them."""
    for block in BLOCKS:
        match = FILE_NAME.match(block)
        if match:
            (folder / match.group(1)).write_text(block)


def run_script(code: str, folder: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Save ``code`` in ``folder`` (as the file it names, else ``example.py``) next to the README's other
    named files and run it with this venv's python, in ``folder``, without PYTHONPATH."""
    user_files(folder)
    match = FILE_NAME.match(code)
    script = folder / (match.group(1) if match else "example.py")
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the installed package, as a user
    return subprocess.run([sys.executable, script.name], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_has_python_programs():
    assert BLOCKS, "README has no python example"
    assert any(not any(marker in b for marker in NEEDS) for b in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_a_script(index, tmp_path, digits_experiment):
    code = BLOCKS[index]
    for marker, why in NEEDS.items():
        if marker in code:
            pytest.skip(f"README python block {index} {why}")
    done = run_script(code, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    if "api-out" in code:  # the Python API example
        assert "dashboard: http" in done.stdout
        mean = float(re.search(r"held-out correlation: mean (\d\.\d+)", done.stdout).group(1))
        assert mean > 0.6
        assert (tmp_path / "api-out" / "attributions.pt").is_file()
    if "my-out" in code:  # Attribute your own model: the user's module beside the script, no PYTHONPATH
        assert (tmp_path / "my_model.py").is_file()
        assert "<Attributions: 96 named components x 297 examples" in done.stdout
        assert re.search(r"\+ fc[12]\[\d+\]", done.stdout)
        mean = float(re.search(r"held-out correlation: mean (\d\.\d+)", done.stdout).group(1))
        assert mean > 0.6


def test_readme_attributes_a_users_own_model():
    """The own-model section: a module of the user's, a script importing it by path, its YAML form."""
    named = [FILE_NAME.match(b).group(1) for b in BLOCKS if FILE_NAME.match(b)]
    assert {"my_model.py", "attribute_my_model.py"} <= set(named)
    script = next(b for b in BLOCKS if b.startswith("# attribute_my_model.py"))
    assert 'if __name__ == "__main__":' in script and '"my_model:load_model"' in script
    text = README.read_text()
    assert "# my_experiment.yaml" in text and "client.upload_file" in text and "regular expression" in text


@pytest.mark.slow
def test_a_script_without_the_main_guard_says_so_in_one_line(tmp_path):
    code = textwrap.dedent("""\
        from coar_dask import cluster_client

        with cluster_client("local", n_workers=1) as client:
            print("dashboard:", client.dashboard_link)
        """)
    done = run_script(code, tmp_path, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("coar_dask.errors.ConfigError: ") and 'if __name__ == "__main__":' in last
    assert "example.py (line 3)" in last
    assert "Nanny failed to start" not in done.stderr and "dashboard" not in done.stdout


def test_readme_says_how_to_reach_the_installed_package_and_how_long_the_tests_take():
    """Issue 24 items 6 and 7: a newcomer after `make demo` and before `make test`."""
    text = README.read_text()
    two_commands = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in two_commands and "ModuleNotFoundError" in two_commands
    assert re.search(r"make test .*about \d+ minutes on 2 cores", two_commands)
    assert "three stores" in two_commands and "the two stores" not in text
