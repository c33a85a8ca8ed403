"""``verify_store`` / ``repair_store`` and the ``verify`` / ``repair`` commands.

The stores here are synthetic (masks from ``sample_masks``, seeded finite
outputs, written with ``Store.write_block``), so these tests need no model and
run in seconds; ``test_faults.py`` runs the same checks on real builds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from coar_dask.errors import StoreError, StoreNotFoundError
from coar_dask.core.masks import sample_masks
from coar_dask.core.spec import Spec
from coar_dask.core.store import COMPLETED, init_store, open_store
from coar_dask.core.verify import PROBLEM_KINDS, repair_store, verify_store

N, RPC, P, K = 120, 20, 30, 12
SEED, ALPHA = 3, 0.1


def _outputs(rows: np.ndarray) -> np.ndarray:
    """Finite float16 outputs that depend only on the row (so a rewrite is bitwise equal)."""
    return np.stack([np.random.default_rng(int(r)).normal(size=K) for r in rows]).astype(np.float16)


def _write(store, b: int) -> None:
    rows = store.block(b).rows
    store.write_block(b, {"masks": sample_masks(SEED, rows, P, ALPHA), "margins": _outputs(rows)})


def make_store(path: Path, blocks=None, *, seed: int | None = SEED, alpha: float | None = ALPHA,
               digests: bool = True):
    """A store of N rows in RPC-row blocks with ``blocks`` (default all) written."""
    store = init_store(path, Spec.for_experiment(N, P, K), rows_per_chunk=RPC, mask_seed=seed, alpha=alpha,
                       digests=digests)
    for b in range(store.n_blocks) if blocks is None else blocks:
        _write(store, b)
    return store


@pytest.fixture(scope="module")
def _complete_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("verify") / "store").path


@pytest.fixture
def store(_complete_store, tmp_path):
    """A fresh copy of a complete, intact store."""
    path = tmp_path / "store"
    shutil.copytree(_complete_store, path)
    return open_store(path)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chunk(store, name: str, b: int) -> Path:
    return store.chunk_path(name, b)


def run_cli(argv: list[str]) -> int:
    """``coar-dask verify|repair ...``, in this process."""
    from coar_dask.cli.main import main

    return main(argv)


# --------------------------------------------------------------------- intact


def test_intact_complete_store_is_ok(store, capsys):
    before = snapshot(store.path)
    report = verify_store(store.path)
    assert report.ok and report.intact and report.complete
    assert report.masks_checked and report.rows_checked == N
    assert report.completed_rows == N and report.completed_blocks == store.n_blocks
    assert report.problems == () and report.bad_blocks == ()
    assert run_cli(["verify", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and f"{N} / {N} completed" in out
    assert snapshot(store.path) == before, "verify must only read"


def test_many_bad_blocks_are_summarised_in_text_and_listed_in_json(tmp_path, capsys):
    s = init_store(tmp_path / "s", Spec.for_experiment(200, 4, 2), rows_per_chunk=2, mask_seed=SEED, alpha=ALPHA)
    for b in range(s.n_blocks):  # every block written with the masks of another seed
        rows = s.block(b).rows
        s.write_block(b, {"masks": sample_masks(SEED + 1, rows, 4, 0.5), "margins": np.zeros((2, 2))})
    report = verify_store(s)
    assert len(report.bad_blocks) > 60
    text = report.format()
    assert sum(line.startswith("BAD BLOCK ") for line in text.splitlines()) == 50 and "more problem(s)" in text
    assert run_cli(["verify", str(s.path), "--json"]) == 1
    assert len(json.loads(capsys.readouterr().out)["bad_blocks"]) == len(report.bad_blocks)


def test_commands_exit_codes_and_a_missing_store_is_one_line(store, capsys):
    assert run_cli(["verify", str(store.path)]) == 0
    assert run_cli(["repair", str(store.path), "--dry-run"]) == 0
    capsys.readouterr()
    assert run_cli(["verify", str(store.path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no coar_dask store" in err and err.startswith("coar-dask verify: error: ")
    assert len(err.strip().splitlines()) == 1


def test_the_library_module_has_no_command_line():
    import coar_dask.core.verify as core_verify

    assert not hasattr(core_verify, "main") and "argparse" not in vars(core_verify)


def test_json_report_is_machine_readable(store, capsys):
    assert run_cli(["verify", "--store", str(store.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["bad_blocks"] == [] and data["incomplete_blocks"] == []
    assert data["num_rows"] == N and data["rows_per_chunk"] == RPC and data["masks_checked"] is True


def test_incomplete_blocks_are_listed_and_fail_unless_allowed(tmp_path, capsys):
    s = make_store(tmp_path / "s", blocks=[0, 1, 4])
    report = verify_store(s)
    assert report.intact and not report.complete and not report.ok
    assert report.incomplete_blocks == (2, 3, 5)
    assert report.rows_checked == 3 * RPC
    assert run_cli(["verify", str(s.path)]) == 1
    assert "2-3, 5" in capsys.readouterr().out
    assert run_cli(["verify", str(s.path), "--allow-incomplete"]) == 0


def _flag_rows_of_block_1(s) -> None:
    rows = np.arange(20, 27)  # 7 rows of block 1, as a seed import might flag them
    s.array("masks")[20:27] = sample_masks(SEED, rows, P, ALPHA)
    s.array("margins")[20:27] = _outputs(rows)
    s.array(COMPLETED)[20:27] = True


def test_a_partly_flagged_block_is_incomplete_and_its_flagged_rows_are_checked(tmp_path):
    # An imported store (no digests: the import writes rows without write_block).
    s = make_store(tmp_path / "s", blocks=[0], digests=False)
    _flag_rows_of_block_1(s)
    report = verify_store(s)
    assert report.intact and report.partial_blocks == (1,) and 1 in report.incomplete_blocks
    assert report.rows_checked == RPC + 7 and report.completed_rows == RPC + 7
    assert any("no block digests" in n for n in report.notes)


def test_rows_flagged_without_a_build_in_a_store_with_digests_are_a_bad_block(tmp_path):
    s = make_store(tmp_path / "s", blocks=[0])
    _flag_rows_of_block_1(s)
    report = verify_store(s)
    assert report.bad_blocks == (1,) and [p.kind for p in report.problems] == ["no_digest"]
    assert not any("no block digests" in n for n in report.notes)


def test_store_without_a_mask_seed_is_checked_without_masks(tmp_path):
    s = init_store(tmp_path / "s", Spec.for_experiment(N, P, K), rows_per_chunk=RPC)
    for b in range(s.n_blocks):
        rows = s.block(b).rows
        s.write_block(b, {"masks": sample_masks(SEED, rows, P, ALPHA), "margins": _outputs(rows)})
    report = verify_store(s)
    assert report.ok and not report.masks_checked
    assert any("no mask seed" in n for n in report.notes)


# ----------------------------------------------------------- damaged chunks


@pytest.mark.parametrize("name", ["masks", "margins"])
def test_truncated_chunk_is_reported_with_its_block(store, name, capsys):
    f = chunk(store, name, 2)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    report = verify_store(store)
    assert not report.ok and report.bad_blocks == (2,)
    (p,) = report.problems
    assert p.kind == "unreadable" and p.array == name and p.block == 2
    assert run_cli(["verify", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "BAD BLOCK 2" in out and "coar-dask repair" in out


def test_chunk_overwritten_with_random_bytes_is_reported(store):
    f = chunk(store, "margins", 4)
    f.write_bytes(os.urandom(f.stat().st_size))
    report = verify_store(store)
    assert report.bad_blocks == (4,) and report.problems[0].kind == "unreadable"


@pytest.mark.parametrize("trial", range(12))
def test_bytes_changed_inside_a_chunk_are_detected(store, trial):
    """A few bytes changed in the middle of a chunk file must not decode into
    plausible, finite numbers: a checksum in every codec chain (zstd's frame
    checksum for outputs, crc32c after blosc for masks) catches what the mask
    comparison and the finiteness check cannot."""
    rng = np.random.default_rng(trial)
    name = ("margins", "masks")[trial % 2]
    f = chunk(store, name, 1)
    data = bytearray(f.read_bytes())
    at = int(rng.integers(16, len(data) - 16))
    new = bytes((b + 1 + int(rng.integers(0, 255))) % 256 for b in data[at : at + 4])
    data[at : at + 4] = new
    f.write_bytes(bytes(data))
    report = verify_store(store)
    assert report.bad_blocks == (1,), report.format()


def test_missing_chunk_of_a_completed_block_is_reported(store):
    chunk(store, "margins", 3).unlink()
    report = verify_store(store)
    assert report.bad_blocks == (3,) and report.problems[0].kind == "missing"


def test_masks_that_do_not_regenerate_are_reported_with_rows(store):
    rows = store.block(5).rows
    other = sample_masks(SEED + 1, rows, P, ALPHA)
    store.write_block(5, {"masks": other, "margins": _outputs(rows)})
    report = verify_store(store)
    (p,) = report.problems
    assert p.kind == "mask_mismatch" and p.block == 5 and set(p.rows) <= set(rows.tolist()) and p.rows


def test_nonfinite_outputs_are_reported_with_rows_and_examples(store):
    rows = store.block(0).rows
    y = _outputs(rows)
    y[3, 7] = np.nan
    y[5, 2] = np.inf
    store.write_block(0, {"masks": sample_masks(SEED, rows, P, ALPHA), "margins": y})
    (p,) = verify_store(store).problems
    assert p.kind == "nonfinite" and p.rows == (3, 5)
    assert "[2, 7]" in p.message


def test_damaged_completion_chunk_is_reported_and_blocks_a_build_with_the_fix(store):
    f = chunk(store, COMPLETED, 3)
    f.write_bytes(os.urandom(max(f.stat().st_size, 16)))
    report = verify_store(store)
    assert report.bad_blocks == (3,) and 3 in report.incomplete_blocks
    assert report.problems[0].array == COMPLETED
    with pytest.raises(StoreError, match="coar-dask repair"):
        open_store(store.path).pending_blocks()
    repair_store(store.path)
    assert open_store(store.path).pending_blocks() == [store.block(3)]


# ------------------------------------------------------------------ metadata


def _edit_meta(path: Path, **changes) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    meta = dict(group.attrs["coar_dask"])
    meta.update(changes)
    group.attrs["coar_dask"] = meta


def test_spec_fingerprint_mismatch_is_a_store_problem_repair_cannot_fix(store, capsys):
    _edit_meta(store.path, spec_sha256="0" * 64)
    report = verify_store(store.path)
    assert not report.intact and report.bad_blocks == ()
    assert report.store_problems[0].kind == "spec"
    before = snapshot(store.path)
    result = repair_store(store.path)
    assert not result.ok and result.reset_blocks == () and snapshot(store.path) == before
    assert run_cli(["repair", str(store.path)]) == 1
    assert "UNREPAIRABLE" in capsys.readouterr().out


def test_experiment_record_that_does_not_match_its_fingerprint(store, tiny_experiment):
    _edit_meta(store.path, experiment=tiny_experiment.to_dict(), experiment_fingerprint="f" * 64,
               mask_seed=tiny_experiment.mask_seed, alpha=tiny_experiment.alpha)
    kinds = {p.kind for p in verify_store(store.path).store_problems}
    assert kinds == {"experiment"}


def test_chunk_layout_that_differs_from_the_spec_is_reported(tmp_path):
    s = make_store(tmp_path / "s")
    import zarr

    group = zarr.open_group(str(s.path), mode="r+", zarr_format=3)
    values = group["margins"][:]
    del group["margins"]
    group.create_array("margins", shape=values.shape, chunks=(RPC // 2, K), dtype=values.dtype, fill_value=0)
    group["margins"][:] = values
    report = verify_store(s.path)
    (p,) = report.store_problems
    assert p.kind == "layout" and p.array == "margins" and f"({RPC // 2}, {K})" in p.message
    assert report.masks_checked  # the other arrays are still checked


def test_problem_kinds_are_documented():
    assert {"unreadable", "missing", "mask_mismatch", "nonfinite", "spec", "layout", "experiment"} <= set(PROBLEM_KINDS)


# -------------------------------------------------------------------- repair


def test_repair_resets_only_bad_blocks_and_a_rewrite_restores_the_store(store, _complete_store, capsys):
    reference = snapshot(_complete_store)
    chunk(store, "masks", 1).write_bytes(b"not zstd")
    chunk(store, "margins", 4).write_bytes(chunk(store, "margins", 4).read_bytes()[:10])
    untouched = {n: b for n, b in snapshot(store.path).items() if "/c/1" not in n and "/c/4" not in n}

    dry = repair_store(store.path, dry_run=True)
    assert dry.reset_blocks == (1, 4) and dry.dry_run
    assert run_cli(["repair", str(store.path), "--dry-run"]) == 0
    assert verify_store(store.path).bad_blocks == (1, 4)  # a dry run changes nothing

    capsys.readouterr()
    assert run_cli(["repair", str(store.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reset_blocks"] == [1, 4]
    after = snapshot(store.path)
    for name, data in untouched.items():
        if not name.startswith(COMPLETED):
            assert after[name] == data, name
    report = verify_store(store.path)
    assert report.intact and report.incomplete_blocks == (1, 4)
    s = open_store(store.path)
    assert [b.index for b in s.pending_blocks()] == [1, 4]
    for b in s.pending_blocks():  # what a rebuild does
        _write(s, b.index)
    assert verify_store(store.path).ok
    assert snapshot(store.path) == reference


def test_repair_json_and_text_reports(store, capsys):
    chunk(store, "margins", 5).write_bytes(b"x")
    assert run_cli(["repair", str(store.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reset_blocks"] == [5] and data["ok"] is True and data["removed_files"] == ["margins/c/5/0"]
    assert run_cli(["repair", str(store.path)]) == 0
    assert "no bad blocks" in capsys.readouterr().out


def test_temporary_files_of_killed_writers_are_listed_not_failures_and_removed_by_repair(store):
    leftover = chunk(store, "margins", 2).with_suffix(".3f2a9c.partial")
    leftover.write_bytes(b"half a chunk")
    report = verify_store(store.path)
    assert report.ok and report.temp_files == (str(leftover.relative_to(store.path)),)
    result = repair_store(store.path)
    assert result.reset_blocks == () and not leftover.exists()


def test_repair_refuses_a_report_of_another_store(store, tmp_path):
    other = make_store(tmp_path / "other", blocks=[0])
    with pytest.raises(StoreError, match="verify this store first"):
        repair_store(store.path, report=verify_store(other))


# ------------------------------------------------------------- user errors


@pytest.mark.parametrize("command", ["verify", "repair"])
def test_no_store_is_a_one_line_user_error(tmp_path, capsys, command):
    before = snapshot(tmp_path)
    assert run_cli([command, str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "no coar_dask store" in err and "coar-dask init" in err
    assert snapshot(tmp_path) == before
    with pytest.raises(StoreNotFoundError):
        verify_store(tmp_path / "nowhere")


def test_a_file_is_not_a_store(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("hello")
    assert run_cli(["verify", str(f)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err


def test_no_store_argument_says_how_to_give_one(capsys):
    assert run_cli(["verify"]) == 2
    assert "needs a store directory" in capsys.readouterr().err


def test_damaged_root_metadata_is_a_one_line_error(store, capsys):
    (store.path / "zarr.json").write_bytes(b"{ not json")
    assert run_cli(["verify", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert "zarr.json" in err and "Traceback" not in err


# -------------------------------------------------------------- durability


def test_write_block_makes_data_durable_before_flagging_it_completed(tmp_path, monkeypatch):
    """``_completed`` is set only after the block's data chunks are fsync'ed (and
    the directory entries of their renames), so a power loss cannot leave a
    completed block whose data never reached the disk."""
    import zarr.storage._local as local

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsync'ed descriptors")
    s = make_store(tmp_path / "s", blocks=[])
    events: list[tuple[str, str]] = []
    real_fsync, real_put = os.fsync, local._put

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def put(path, value, exclusive=False):
        events.append(("put", os.path.realpath(path)))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(local, "_put", put)
    _write(s, 2)
    flag = os.path.realpath(s.chunk_path(COMPLETED, 2))
    flagged_at = events.index(("put", flag))
    synced = {p for kind, p in events[:flagged_at] if kind == "fsync"}
    for name in ("masks", "margins"):
        data = os.path.realpath(s.chunk_path(name, 2))
        assert data in synced, f"{name} chunk not fsync'ed before _completed was written: {events}"
        assert os.path.dirname(data) in synced, f"directory of {name} chunk not fsync'ed: {events}"
    assert ("fsync", flag) in events[flagged_at:]
