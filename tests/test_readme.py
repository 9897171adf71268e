"""The README's Python example runs as written and prints the seven metrics."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = re.search(r"## In Python\s+```python\n(.*?)```", readme, re.S).group(1)
    assert len(example.strip().splitlines()) <= 12
    proc = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = eval(proc.stdout.strip().splitlines()[-1])  # a dict literal of floats
    assert set(printed) == {"se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js"}
    assert 1 <= printed["pr_pre"] <= 37 and 0 <= printed["js"] <= 0.7


def test_readme_opens_with_the_two_commands():
    # issue #29: a user reads how to install (pip, the extras) before a developer reads how to run the tests;
    # the two commands stay the first ones of a clone
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b.splitlines() for b in re.findall(r"```bash\n(.*?)```", readme, re.S)]
    commands = [[line.split("#")[0].strip() for line in block] for block in blocks]
    assert commands[0][0] == "pip install ." and 'pip install ".[all]"' in commands[0]
    clone = next(i for i, block in enumerate(commands) if "bash dev.sh test" in block)
    assert commands[clone] == ["bash dev.sh demo", "bash dev.sh test"]
    assert readme.index("## Install") < readme.index("bash dev.sh test")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash dev.sh test" in ci
