"""fxclip.distributed, the documented path of `fxclip.dp.distributed` (DP-SGD training lives in fxclip/dp/)."""
from .dp.distributed import *  # noqa: F401,F403
