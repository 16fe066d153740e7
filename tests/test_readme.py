"""The README stays a short guide whose commands are the ones CI and users run."""
from __future__ import annotations

import re

from conftest import ROOT


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = ci.split("keep the two identical) ---\n", 1)[1].strip().splitlines()[0]
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_block = next(b for b in blocks if "pytest" in b)
    # the README's command makes the venv first; CI's script does that in the lines above its copy
    assert test_block.strip().endswith(ci_command), (test_block, ci_command)
    assert any("dvc repro" in b and "pip install torch==2.13.0" in b for b in blocks)


def test_readme_is_a_guide_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for path in set(re.findall(r"`(docs/[\w./-]+\.md)`", readme)):
        assert (ROOT / path).is_file(), path


def test_docs_name_code_that_exists():
    """Every ``pipeline/...py`` file and ``python -m pipeline.<module>`` command the README and docs name
    exists (the layout move left 14 stale file names in docs/)."""
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "cuda_ext").glob("*.md")]
    missing = []
    for doc in docs:
        text = doc.read_text()
        for path in set(re.findall(r"\bpipeline/[\w/]+\.py\b", text)):
            if not (ROOT / path).is_file():
                missing.append(f"{doc.name}: {path}")
        for module in set(re.findall(r"python -m (pipeline(?:\.\w+)+)", text)):
            base = ROOT / module.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                missing.append(f"{doc.name}: {module}")
    assert not missing, missing
