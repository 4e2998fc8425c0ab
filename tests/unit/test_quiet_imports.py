"""megaclm.logging.quiet at the source: a tool's entry point, then DeepSpeed and peft (which imports torchao)."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

ALARM = re.compile(r"warn|error|unable|fail|deprecated", re.IGNORECASE)
IMPORTS = "import deepspeed, peft"


def _stderr_lines(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in (proc.stdout + proc.stderr).splitlines() if ALARM.search(line)]


def test_entry_point_hides_the_import_noise_of_deepspeed_and_peft():
    assert _stderr_lines(f"from megaclm.logging.quiet import entry_point; entry_point(); {IMPORTS}") == []


def _library_lines(lines: list[str]) -> int:
    return sum(bool(re.search(r"Failed to load \S*torchao|is an Enum subclass", line)) for line in lines)


def test_without_it_the_imports_warn_and_show_all_brings_the_filtered_lines_back():
    bare = _stderr_lines(IMPORTS)
    shown = _stderr_lines(f"from megaclm.logging import quiet; quiet.entry_point(); quiet.show_all(); {IMPORTS}")
    if not torch.cuda.is_available():  # with a GPU DeepSpeed finds it: there is no guess to warn about
        assert any("Setting accelerator to CPU" in line for line in bare), bare
    assert _library_lines(shown) == _library_lines(bare), (shown, bare)  # torchao's and torch's, as printed bare
