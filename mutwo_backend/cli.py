"""Command line: ``python -m mutwo_backend profile --model resnet152 ...``."""

import argparse
import logging
import sys
import time

import torch

from .capture import capture_train_step
from .errors import MutwoError
from .models import MODELS, get_model, zoo_train_step

log = logging.getLogger("mutwo")

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3, fused=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mutwo_backend",
        description="Profile one training iteration of a model at the level of its fx graph.")
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser(
        "profile", help="capture a model's train step and summarise its graph",
        description="Capture forward, loss, backward and optimizer step of a zoo model as one "
                    "graph and print a summary.")
    profile.add_argument("--model", choices=sorted(MODELS), default="resnet152",
                         help="zoo model, built with random weights (default: resnet152)")
    profile.add_argument("--batch-size", type=int, default=None,
                         help="mini-batch size (default: 32 on a GPU, 2 on the CPU)")
    profile.add_argument("--seq-len", type=int, default=None,
                         help="sequence length for BERT models (default: 512 for bert, 64 for bert-tiny)")
    profile.add_argument("--device", choices=["cpu", "cuda"], default=default_device(),
                         help="where the step runs (default: cuda when available, else cpu)")
    profile.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam",
                         help="adam and adamw are fused; sgd uses momentum 0.9 (default: adam)")
    return parser


class Phases:
    """Logs each phase of a long job with the time it took."""

    def __init__(self):
        self.start = time.perf_counter()

    def run(self, name: str, fn, *args):
        log.info("%s ...", name)
        begin = time.perf_counter()
        result = fn(*args)
        now = time.perf_counter()
        log.info("%s done in %.1f s (%.1f s elapsed)", name, now - begin, now - self.start)
        return result


def profile(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MutwoError("--device cuda was asked for but no CUDA GPU is visible: "
                         "use --device cpu (or run on a machine with a GPU).")
    spec = get_model(args.model)
    device = torch.device(args.device)
    batch_size = args.batch_size or (32 if device.type == "cuda" else 2)
    seq_len = args.seq_len or spec.default_seq_len
    phases = Phases()
    model = phases.run(f"building {spec.name}", lambda: spec.build().to(device))
    optimizer = OPTIMIZERS[args.optimizer](model.parameters())
    inputs, targets = spec.make_batch(batch_size, seq_len, device)
    step = phases.run("capture", capture_train_step, zoo_train_step(spec), model, optimizer, inputs, targets)
    print(f"model {spec.name}, batch {batch_size}" + (f", seq {seq_len}" if seq_len else "")
          + f", {args.optimizer}, device {device}, torch {torch.__version__}")
    print(step.summary())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[mutwo %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        {"profile": profile}[args.command](args)
    except MutwoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
