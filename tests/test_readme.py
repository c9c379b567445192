"""The README's Python snippets run one after the other, as written, in a fresh interpreter (as a
new user pastes them), on CPU without downloads; so do those of the docs that say "run as written"."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_snippets(document: str = "README.md"):
    return re.findall(r"```python\n(.*?)```", (REPO / document).read_text(), flags=re.S)


def run_in_order(snippets, tmp_path):
    script = "\n".join(f"# --- snippet {i}\n{code}" for i, code in enumerate(snippets, 1))
    (tmp_path / "snippets.py").write_text(script)
    env = {**os.environ, "GRANQ_FUSED": "eager", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(tmp_path / "snippets.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def test_readme_has_snippets():
    assert len(python_snippets()) >= 4


def test_readme_snippets_run_in_order(tmp_path):
    done = run_in_order(python_snippets(), tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]


def test_torchao_doc_snippets_run_as_written(tmp_path):
    snippets = python_snippets("docs/TORCHAO.md")
    assert len(snippets) >= 2
    done = run_in_order(snippets, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
