"""fxclip.graph_view, the documented path of `fxclip.tools.graph_view` (the tools live in fxclip/tools/)."""
from .tools.graph_view import *  # noqa: F401,F403
