"""fxclip.memory, the documented path of `fxclip.tools.memory.peak_memory` and the `fxclip memory`
command (`fxclip.tools.memory_cmd`): `python -m fxclip.memory ...` is `fxclip memory ...`."""
from .tools.memory_cmd import peak_memory, step_memory  # noqa: F401

if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main(["memory", *sys.argv[1:]]))
