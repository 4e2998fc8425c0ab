import sys
from pathlib import Path

# The launcher-test harness (corpus, metrics readers, /dev/shm clean-up) lives with the integration tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
