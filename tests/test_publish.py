"""Publishing outputs: a folder is swapped in atomically (never missing, never mixed for a reader
holding it open), concurrent writers serialize, a killed run's leftovers are cleaned by the next one,
and two stages may create a fresh MLflow store at once."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from pipeline.infra import artifacts
from pipeline.infra.artifacts import atomic_dir, publish

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.infra.artifacts import atomic_dir
    path, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        with atomic_dir(path) as tmp:
            for f in ("a", "b", "c"):
                (tmp / f).write_text(f"{me}-{i}")
""")

READER = textwrap.dedent("""
    import os, sys, time
    path, seconds = sys.argv[1], float(sys.argv[2])
    missing = mixed = reads = 0
    end = time.time() + seconds
    while time.time() < end:
        try:
            fd = os.open(path, os.O_RDONLY)  # the folder as it is now: read through it, not the path
        except FileNotFoundError:
            missing += 1
            continue
        try:
            seen = set()
            for f in ("a", "b", "c"):
                with open(os.open(f, os.O_RDONLY, dir_fd=fd)) as h:
                    seen.add(h.read())
            mixed += len(seen) != 1
            reads += 1
        except FileNotFoundError:  # the old folder was removed under us after the swap
            pass
        finally:
            os.close(fd)
    print(missing, mixed, reads)
""")


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(artifacts._RENAMEAT2 is None, reason="no renameat2 on this system (two-rename fallback)")
def test_two_writers_and_a_reader(tmp_path):
    path = tmp_path / "out"
    with atomic_dir(path) as tmp:
        for f in ("a", "b", "c"):
            (tmp / f).write_text("init")
    reader = _python(READER, str(path), "6")
    writers = [_python(WRITER, str(path), name, "150") for name in ("w1", "w2")]
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err[-2000:]
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err[-2000:]
    missing, mixed, reads = map(int, out.split())
    assert missing == 0 and mixed == 0 and reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or .old left
    assert len({(path / f).read_text() for f in ("a", "b", "c")}) == 1


def test_publish_without_renameat2_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_RENAMEAT2", None)
    path = tmp_path / "out"
    for text in ("one", "two"):
        with atomic_dir(path) as tmp:
            (tmp / "x").write_text(text)
    assert (path / "x").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_kill_after_the_swap_leaves_the_new_folder_and_the_next_run_cleans_up(tmp_path):
    """A run killed right after the swap (before it removed the old folder) leaves the new output at
    its path and the old one in its dead staging folder; the next publish of that path removes it."""
    path = tmp_path / "out"
    with atomic_dir(path) as tmp:
        (tmp / "x").write_text("old")
    killed = textwrap.dedent("""
        import os, shutil, sys
        from pathlib import Path
        from pipeline.infra.artifacts import atomic_dir
        shutil.rmtree = lambda *a, **k: os._exit(9)  # killed between the swap and the clean-up
        with atomic_dir(Path(sys.argv[1])) as tmp:
            (tmp / "x").write_text("new")
    """)
    proc = _python(killed, str(path))
    proc.communicate(timeout=60)
    assert proc.returncode == 9
    assert (path / "x").read_text() == "new"
    left = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(left) == 1 and (left[0] / "x").read_text() == "old"
    with atomic_dir(path) as tmp:
        (tmp / "x").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_live_runs_are_kept(tmp_path):
    mine = tmp_path / f".out.{os.getpid()}-abc"
    mine.mkdir()
    dead = tmp_path / ".out.999999999-abc.tmp"
    dead.write_text("x")
    artifacts.clean_leftovers(tmp_path, ".out.")
    assert mine.exists() and not dead.exists()


def test_publish_a_file_over_a_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    tmp = tmp_path / ".f.json.tmp"
    tmp.write_text("new")
    publish(tmp, target)
    assert target.read_text() == "new" and not tmp.exists()


STAGE_RUN = textwrap.dedent("""
    import sys
    from omegaconf import OmegaConf
    from pipeline.infra.tracking import stage_run
    cfg = OmegaConf.create({"model": {"name": "tiny"}, "mlflow": {"tracking_uri": sys.argv[1]}})
    with stage_run(cfg, "probe"):
        pass
""")


def test_two_stages_create_a_fresh_mlflow_store_at_once(tmp_path):
    for trial in range(2):
        uri = f"sqlite:///{tmp_path / f'mlflow{trial}.db'}"
        procs = [_python(STAGE_RUN, uri) for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
