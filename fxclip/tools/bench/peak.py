"""Peak memory of one step of one method, in a fresh process:
`python -m fxclip.tools.bench.peak MODEL BATCH METHOD` prints {"peak_bytes": N} as its last line.

N is the peak resident set size during one step minus the resident set size just before it, after
a warm-up step (which compiles, for compiled methods); Linux's peak counter is reset first
(/proc/self/clear_refs), so imports, model creation and compilation are not counted.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from fxclip.zoo import PerExampleCrossEntropy

from .methods import METHODS


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv=None) -> int:
    from .runner import setup

    model_name, batch, method_name = (argv or sys.argv[1:])[:3]
    model, inputs, targets = setup(model_name, int(batch), torch.device("cpu"))
    method = METHODS[method_name](model, PerExampleCrossEntropy(), 1.0, inputs, targets)
    method.step()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    method.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
