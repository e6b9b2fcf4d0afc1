"""Show what fxclip does to a model: the explain table, and optionally the step as code or a picture.

MODEL is a zoo name (`fxclip inspect mnist_cnn`, which brings its own example batch) or
`module:factory`, a callable returning an nn.Module (`fxclip inspect fxclip.zoo:MnistCNN
--input-shape 1,28,28`), given the shape of one example's input. The model's output decides the
loss: cross-entropy against random classes for [B, classes] outputs, squared error otherwise.
Nothing is trained; no gradients are kept.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fxclip
from fxclip import zoo
from fxclip.options import STRATEGIES

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fxclip inspect` options."""
    parser.add_argument("model", metavar="MODEL", help=f"zoo name ({', '.join(zoo.ZOO)}) or module:factory")
    parser.add_argument("--input-shape", metavar="D1,D2,...", help="one example's input shape (module:factory models)")
    parser.add_argument("--input-dtype", default="float32", choices=sorted(DTYPES), help="default %(default)s")
    parser.add_argument("--vocab", type=int, default=100, help="token ids are drawn below this for int64 inputs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="default %(default)s")
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES, help="default %(default)s")
    parser.add_argument("--memory-budget", type=float, help="elements per example the norms may use")
    parser.add_argument("--code", action="store_true", help="also print the traced step as code, grouped by phase")
    parser.add_argument("--graph", metavar="PATH", help="write the step graph: .dot (DOT text), or .svg/.png/.pdf (needs graphviz)")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")


def load_factory(spec: str):
    """'package.module:attr.attr' -> that callable."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (MODEL is module:factory)")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable; MODEL must name a function or class that returns an nn.Module")
    return obj


def _per_example_shape(text: str | None) -> tuple[int, ...]:
    if not text:
        raise ValueError("a module:factory model needs --input-shape, the shape of one example's input (e.g. 1,28,28)")
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"--input-shape must be positive integers separated by commas, got {text!r}")
    return shape


def model_and_batch(args: argparse.Namespace):
    """(model, inputs tuple, targets, loss_fn) for the MODEL argument."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if ":" not in args.model:
        if args.model not in zoo.ZOO:
            raise ValueError(f"unknown zoo model {args.model!r}; choose one of {sorted(zoo.ZOO)} or give module:factory")
        entry = zoo.ZOO[args.model]
        model = entry.factory()
        inputs, _ = entry.make_batch(args.batch_size, generator)
    else:
        model = load_factory(args.model)()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{args.model} returned a {type(model).__name__}, not an nn.Module")
        shape = (args.batch_size, *_per_example_shape(args.input_shape))
        dtype = DTYPES[args.input_dtype]
        if dtype.is_floating_point:
            inputs = (torch.randn(shape, generator=generator, dtype=dtype),)
        else:
            inputs = (torch.randint(0, args.vocab, shape, generator=generator),)
    with torch.no_grad():
        out = model(*inputs)
    if out.dim() == 2 and out.dtype.is_floating_point:
        targets = torch.randint(0, out.shape[1], (args.batch_size,), generator=generator)
        return model, inputs, targets, lambda o, y: F.cross_entropy(o, y, reduction="none")
    targets = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return model, inputs, targets, lambda o, y: (o - y).pow(2).flatten(1).sum(1)


def run(args: argparse.Namespace) -> int:
    """Run `fxclip inspect` with parsed arguments."""
    model, inputs, targets, loss_fn = model_and_batch(args)
    t = fxclip.transform(model, loss_fn, 1.0, strategy=args.strategy, memory_budget=args.memory_budget)
    print(t.explain(inputs, targets))
    if args.code or args.graph:
        graph = t.graph(inputs, targets)
        if args.code:
            print()
            print(graph.code())
        if args.graph:
            path = Path(args.graph)
            if path.suffix == ".dot":
                path.write_text(graph.to_dot(title=f"fxclip private step: {type(model).__name__}"))
            else:
                graph.render(path, title=f"fxclip private step: {type(model).__name__}")
            print(f"step graph written to {path}", file=sys.stderr)
    return 0
