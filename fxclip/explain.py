"""fxclip.explain, the documented path of `fxclip.tools.explain` (the tools live in fxclip/tools/)."""
from .tools.explain import *  # noqa: F401,F403
