"""Train a CNN: parse the command line into a TrainConfig and call jaxcnn.training.fit.

    python train.py                                   # LeNet-5 on the embedded digits, Adam
    python train.py --model resnet                    # the ResNet, with its own default recipe
    python train.py --dataset mnist --epochs 10       # MNIST, downloaded once into the cache
    python train.py --dataset fashion_mnist --model small_cnn --data-dir ~/data
    python train.py --resume                          # continue the run in --out
    python train.py --overwrite                       # start again, replacing the run in --out
    python train.py --eval-only                       # evaluate the checkpoint in --out
    python train.py --devices 2 --dtype bfloat16      # 2 devices, bfloat16 compute

Every local device is used by default (data parallel, see jaxcnn.parallel). Many hosts: start
the same command on each with --coordinator HOST:PORT --num-processes N --process-id I (or with
$JAX_COORDINATOR_ADDRESS; under srun / mpirun with several tasks it starts by itself; on Cloud
TPU pods and Kubernetes add --distributed).

Exit codes: 0 done, 1 an error (one line, no traceback), 2 bad arguments, 130 Ctrl-C, 143
SIGTERM; after 130 and 143 the message says what is on disk and how to continue.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import NamedTuple

import jax

from jaxcnn import data, models, parallel, reuse_host_memory, training


class Distributed(NamedTuple):
    """The multi-process settings, passed to :func:`jaxcnn.parallel.initialize`."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False


def parse_args(argv=None) -> training.TrainConfig:
    """The command line as a :class:`jaxcnn.training.TrainConfig` (defaults: its defaults)."""
    return parse_command_line(argv)[0]


def parse_command_line(argv=None) -> tuple[training.TrainConfig, Distributed]:
    """The command line as the run's configuration and its multi-process settings.

    Long on purpose: one ``add_argument`` per option, in the order ``--help`` lists them."""
    d = training.TrainConfig()
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a CNN whose layers use hand-derived gradients (jaxcnn).",
        epilog=_recipes_help(),
    )
    p.add_argument("--dataset", choices=data.DATASETS, default=d.dataset,
                   help="synthetic: the embedded digits, no download (default: %(default)s)")
    p.add_argument("--data-dir", default=d.data_dir, metavar="DIR",
                   help="directory with the four IDX files (default: download them once "
                        "into ~/.cache/jaxcnn)")
    p.add_argument("--model", choices=tuple(models.MODELS), default=d.model,
                   help="default: %(default)s")
    p.add_argument("--impl", choices=("manual", "lax"), default=d.impl,
                   help="manual: the hand-derived gradients; lax: JAX's autodiff "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the run; the learning rate follows a cosine over all of them, "
                        "so --resume takes the run's own --epochs (or a larger one once it has "
                        "finished, to extend it) (default: the model's recipe, below)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the model's recipe, below")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, decayed to 0 by a cosine over the run "
                        "(default: the model's recipe, below)")
    p.add_argument("--optimizer", choices=training.OPTIMIZERS, default=d.optimizer,
                   help="momentum: SGD with momentum 0.9 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="initial parameters, batch order and synthetic data (default: "
                        "%(default)s)")
    p.add_argument("--out", default=d.out, metavar="DIR",
                   help="output directory, held by one run at a time; a new run refuses one "
                        "that holds another run's files unless --resume or --overwrite "
                        "(default: runs/<dataset>-<model>-<impl>-seed<seed>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run whose checkpoint is in --out")
    mode.add_argument("--overwrite", action="store_true",
                      help="start a new run in --out, removing the run already there")
    mode.add_argument("--eval-only", action="store_true",
                      help="only evaluate the checkpoint in --out on the test set")
    p.add_argument("--n-train", type=int, default=d.n_train, metavar="N",
                   help="use only the first N training examples (quick runs, tests)")
    p.add_argument("--n-test", type=int, default=d.n_test, metavar="N",
                   help="use only the first N test examples")
    p.add_argument("--devices", type=int, default=d.devices, metavar="N",
                   help="train data-parallel on the first N devices (default: every device of "
                        "every process); --batch-size must be divisible by N")
    p.add_argument("--dtype", choices=training.DTYPES, default=d.dtype,
                   help="compute dtype; bfloat16 keeps float32 master params, optimizer state "
                        "and accumulation (default: %(default)s)")
    dist = p.add_argument_group(
        "many processes (one per host)",
        "Start the same command in every process; JAX's distributed runtime connects\n"
        "them. Process 0 prints and writes the files.")
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0's coordinator service (default: "
                           f"${parallel.COORDINATOR_ENV})")
    dist.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    dist.add_argument("--distributed", action="store_true",
                      help="start the distributed runtime and let JAX read the settings from "
                           "the cluster (Cloud TPU pods, Kubernetes; under srun or mpirun with "
                           "several tasks, and with $JAX_COORDINATOR_ADDRESS, it starts without "
                           "this flag)")
    args = vars(p.parse_args(argv))
    distributed = Distributed(args.pop("coordinator"), args.pop("num_processes"),
                              args.pop("process_id"), args.pop("distributed"))
    try:
        return training.TrainConfig(**args), distributed
    except (TypeError, ValueError) as err:
        p.error(str(err))


def _recipes_help() -> str:
    """The default recipe of each model (jaxcnn.training.RECIPES), for --help."""
    lines = [f"  {name:<10} --epochs {r.epochs} --batch-size {r.batch_size} --lr {r.lr:g}"
             for name, r in ((m, training.recipe_of(m)) for m in models.MODELS)]
    return ("default recipe of each --model (jaxcnn.training.RECIPES; an option given\n"
            "overrides its part):\n" + "\n".join(lines))


def main(argv=None) -> int:
    config, distributed = parse_command_line(argv)
    sigterm = None  # the SIGTERM handler this call replaced, to put back
    try:
        if distributed.coordinator or distributed.process_id is not None:
            where = distributed.coordinator or f"${parallel.COORDINATOR_ENV}"
            print(f"train.py: process {distributed.process_id} of {distributed.num_processes}: "
                  f"connecting to the coordinator at {where}, waiting for every process",
                  file=sys.stderr, flush=True)
        parallel.initialize(distributed.coordinator, distributed.num_processes,
                            distributed.process_id, auto=distributed.auto)
        if jax.process_count() == 1:  # many processes: JAX's preemption service takes SIGTERM
            sigterm = signal.signal(signal.SIGTERM, _terminate) or signal.SIG_DFL
        training.fit(config)
    except training.Preempted as err:
        print(f"train.py: {err}; continue with the same options and --resume", file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    except (ValueError, TypeError, RuntimeError, OSError, FloatingPointError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    except training.Interrupted as err:
        print(f"\ntrain.py: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # before fit started
        terminated = isinstance(err, training.Terminated)
        print(f"\ntrain.py: {'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'} "
              f"before anything was written", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if sigterm is not None:  # as it was: main is called in-process by tests too
            signal.signal(signal.SIGTERM, sigterm)
    return 0


def _terminate(signum, frame):
    """SIGTERM handler: stop like Ctrl-C does, so fit says what is on disk (exit code 143)."""
    raise training.Terminated()


if __name__ == "__main__":
    # The process's allocator, so here and not in main() (which tests call in their own
    # process); before the first computation. See jaxcnn.reuse_host_memory.
    reuse_host_memory()
    sys.exit(main())
