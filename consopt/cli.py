"""Command line: `consopt laws` (the law table of a model) and `consopt profile` (drift vs lr)."""

from __future__ import annotations

import argparse
import importlib
import sys


class UsageError(Exception):
    """A bad command-line argument: printed without a traceback, exit code 2."""


def _builtin_models():
    import torch

    from . import models as M

    def digits_img(batch=4):
        return (torch.randn(batch, 1, 8, 8),)

    def digits_tok(batch=4):
        return (torch.randint(0, 17, (batch, 64)),)

    return {
        "mlp": (lambda: M.MLP([64, 32, 32, 10]), lambda: (torch.randn(4, 64),)),
        "resnet": (lambda: M.resnet_small(in_channels=1, bn=True), digits_img),
        "resnet-nobn": (lambda: M.resnet_small(in_channels=1, bn=False), digits_img),
        "transformer": (lambda: M.TransformerClassifier(), digits_tok),
        "llama": (lambda: M.LlamaClassifier(), digits_tok),
    }


def load_factory(spec: str):
    """`package.module:factory` -> (model, example_inputs). Runs that user code."""
    if ":" not in spec:
        raise UsageError(f"--model expects a built-in name or package.module:factory, got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot load model factory {spec!r}: {e}") from e
    return fn


def cmd_laws(args):
    import consopt

    models = _builtin_models()
    if args.model in models:
        make, inputs = models[args.model]
        model, example = make(), inputs()
    else:
        out = load_factory(args.model)()
        model, example = out[0], out[1]
    model.train()
    laws = consopt.find_laws(model, example, loss=args.loss, approximate=args.approximate)
    print(laws.summary())
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="consopt", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("laws", help="print the conservation laws of a model")
    pl.add_argument("--model", default="resnet", help="built-in (mlp, resnet, resnet-nobn, transformer, llama) "
                    "or package.module:factory returning (model, example_inputs); a factory is imported and run")
    pl.add_argument("--loss", default="cross_entropy", choices=["mse", "cross_entropy"])
    pl.add_argument("--approximate", action="store_true", help="also list approximate scale laws")
    pl.set_defaults(fn=cmd_laws)
    try:
        from .profiler import add_profile_parser
    except ImportError:
        add_profile_parser = None
    if add_profile_parser is not None:
        add_profile_parser(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"consopt {args.cmd}: error: {e}", file=sys.stderr)
        return 2
