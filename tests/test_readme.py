"""The README's Python snippets run one after the other, as written, in a fresh interpreter (as a
new user pastes them), on CPU without downloads."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_snippets():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(python_snippets()) >= 4


def test_readme_snippets_run_in_order(tmp_path):
    script = "\n".join(f"# --- snippet {i}\n{code}" for i, code in enumerate(python_snippets(), 1))
    (tmp_path / "readme_snippets.py").write_text(script)
    env = {**os.environ, "GRANQ_FUSED": "eager", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(tmp_path / "readme_snippets.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
