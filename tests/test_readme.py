"""The README's code blocks run as written, in order, in one namespace (so it cannot drift)."""

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    """Every ```python block of README.md executes without error (their asserts included)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    assert namespace["scores"].shape == (64, 4)
    assert namespace["top"].indices.shape == (5, 4)


def test_readme_opens_with_the_two_commands():
    """README opens with exactly `make demo` and `make test`; .ci/run calls `make test`."""
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (README.parent / ".ci" / "run").read_text()
