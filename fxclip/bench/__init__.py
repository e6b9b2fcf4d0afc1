"""fxclip.bench, the documented path of `fxclip.tools.bench`: `python -m fxclip.bench` runs it."""
from ..tools.bench import *  # noqa: F401,F403
