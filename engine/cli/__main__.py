"""``python -m engine.cli``: the ``terranoha`` command."""

from engine.cli import _exit

if __name__ == "__main__":
    _exit()
