"""Where orch's checkout lies: its profiles, recipes and environment scripts, and the code a run freezes."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
