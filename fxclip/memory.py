"""fxclip.memory, the documented path of `fxclip.tools.memory_cmd` (step_memory, and peak_memory from
`fxclip.peak`): `python -m fxclip.memory ...` runs `fxclip memory ...`."""
from .tools.memory_cmd import *  # noqa: F401,F403

if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main(["memory", *sys.argv[1:]]))
