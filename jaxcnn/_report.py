"""What a training run reports: its console lines, ``metrics.jsonl``, ``summary.json`` and plots.

Strings and files only: :mod:`jaxcnn.training` decides when each is written (by process 0).
"""

from __future__ import annotations

import io
import json
import pathlib
import platform

import jax
import numpy as np
import optax

from . import __version__, _io, parallel
from .nn import count_params

METRICS = "metrics.jsonl"  # one JSON record per finished epoch
SUMMARY = "summary.json"   # the final metrics, configuration, versions, backend
PLOTS = ("curves.png", "filters.png")
PLOTS_SKIPPED = ('plots skipped: matplotlib not installed (pip install -e ".[plot]" in the jaxcnn '
                 'checkout, as in the README)')


# --------------------------------------------------------------------------------------------
# Console lines.


def header(config, ds, params, start_epoch, mesh) -> str:
    """The line a run starts with: what it trains, on what, with which settings, where."""
    what = f"resuming at epoch {start_epoch + 1}" if start_epoch else "training"
    precision = "" if config.dtype == "float32" else f", {config.dtype} compute"
    return (f"{what}: {config.model} ({count_params(params):,} params, impl {config.impl}"
            f"{precision}) on {config.dataset} ({len(ds.train_x)} train / {len(ds.test_x)} "
            f"test), {config.optimizer} lr {config.lr:g}, batch {config.batch_size}, "
            f"{plural(config.epochs, 'epoch')}, seed {config.seed}, "
            f"{parallel.describe(mesh)} -> {config.out_dir}")


def epoch_line(record, epochs) -> str:
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"test loss {record['test_loss']:.4f}  test acc "
            f"{100 * record['test_accuracy']:.2f}%  {record['images_per_second']:.0f} img/s")


def final_line(final, wall_time, out) -> str:
    return (f"test accuracy {100 * final['test_accuracy']:.2f}% after "
            f"{plural(final['epoch'], 'epoch')} ({wall_time:.1f} s); results in {out}")


def eval_line(checkpoint, state, test) -> str:
    return (f"checkpoint {checkpoint} (epoch {state.epoch}, step {state.step}): test "
            f"loss {test['loss']:.4f}  test acc {100 * test['accuracy']:.2f}% "
            f"({test['correct']}/{test['n']})")


def finished_line(out, state, wrote: str = "") -> str:
    """The line of ``--resume`` on a run that has trained all its epochs."""
    return (f"the run in {out} is finished: it has trained all {plural(state.epoch, 'epoch')} "
            f"(step {state.step}){'; ' + wrote if wrote else ''}; nothing to train. To train "
            f"longer, resume it with a larger --epochs")


def extension_note(planned: int, epochs: int, step: int, lr: float) -> str:
    """The note of ``--resume`` with more epochs on a finished run."""
    return (f"note: extending the finished {planned}-epoch run to {epochs} epochs: its cosine "
            f"learning-rate schedule now spans {epochs} epochs and continues at step {step} "
            f"with lr {lr:.3g}, so the result differs from an uninterrupted {epochs}-epoch run")


def settings_note(current: dict, saved: dict, defaults: dict) -> str | None:
    """Which settings of a resumed run differ from its checkpoint's (a changed seed, batch size
    or learning rate makes it differ from an uninterrupted run), or None. A setting newer
    than the checkpoint had its default."""
    ignored = {"epochs", "resume", "eval_only", "overwrite", "out", "devices"}  # devices: rounding
    saved = {**defaults, **saved}
    changed = [f"{k} {saved[k]!r} -> {current[k]!r}" for k in current
               if k not in ignored and saved[k] != current[k]]
    if not changed:
        return None
    return f"note: resuming with settings that differ from the checkpoint's: {', '.join(changed)}"


def test_set_note(config, saved) -> str | None:
    """Say so when ``--eval-only`` measures another test set than the checkpoint's run did."""
    if config.dataset != saved.dataset:
        return (f"note: evaluating on {config.dataset}; the checkpoint was trained on "
                f"{saved.dataset}")
    if config.dataset == "synthetic" and config.seed != saved.seed:
        return (f"note: the synthetic test set depends on the seed: this is the test set of seed "
                f"{config.seed}, but the checkpoint was trained and measured with seed "
                f"{saved.seed}; add --seed {saved.seed} to evaluate it on the same test set")
    return None


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------------------------
# metrics.jsonl and summary.json.


def write_metrics(path, history) -> None:
    """``metrics.jsonl`` holding exactly the records of ``history``, replaced atomically."""
    text = "".join(json.dumps(r) + "\n" for r in history)
    _io.atomic_write(path, lambda f: f.write(text.encode()))


def append_metrics(path, record) -> None:
    """One more epoch's record at the end of ``metrics.jsonl``, durably."""
    _io.append_line(path, json.dumps(record))


def summary(config, history, params, step, wall_time, mesh) -> dict:
    """``summary.json``'s content: the final metrics, configuration, versions and machine."""
    return {
        "final": history[-1] if history else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in history), default=None),
        "epochs": len(history),
        "steps": step,
        "num_params": count_params(params),
        "wall_time_seconds": wall_time,
        "train_seconds_total": sum(r["train_seconds"] for r in history),
        "config": config.to_json(),
        "versions": {"jaxcnn": __version__, "jax": jax.__version__,
                     "jaxlib": _jaxlib_version(), "optax": optax.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in mesh.devices.flat],
        "processes": jax.process_count(),
        "platform": platform.platform(),
    }


def write_summary(path, content: dict) -> None:
    _io.write_json(path, content)


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# Plots.


def save_plots(out, history, params) -> list[pathlib.Path]:
    """``curves.png`` (losses and accuracy per epoch) and ``filters.png`` (the first layer's
    kernels) in ``out``, each written atomically; without matplotlib, print that the plots
    were skipped."""
    try:
        plt = _pyplot()
    except ImportError:
        print(PLOTS_SKIPPED, flush=True)
        return []
    out = pathlib.Path(out)
    curves, filters = (out / name for name in PLOTS)
    paths = [_save(plt, curves, _plot_curves(plt, history))]
    kernel = _first_kernel(params)
    if kernel is not None:
        paths.append(_save(plt, filters, _plot_filters(plt, kernel)))
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, path, fig) -> pathlib.Path:
    """``fig`` as a PNG at ``path``, atomically; the figure is closed."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    _io.atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def _plot_curves(plt, history):
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", color="C1")
    ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def _first_kernel(params):
    """The first leaf of rank 4 (a 2-d convolution kernel), or None."""
    for leaf in jax.tree_util.tree_leaves(params):
        if leaf.ndim == 4:
            return np.asarray(jax.device_get(leaf))
    return None


def _plot_filters(plt, kernel):
    """One image per output channel of ``kernel: (kh, kw, C_in, C_out)``, input channel 0."""
    c_out = kernel.shape[-1]
    cols = min(c_out, 8)
    rows = -(-c_out // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.4), squeeze=False)
    limit = float(np.abs(kernel[..., 0, :]).max()) or 1.0
    for j, ax in enumerate(axes.flat):
        ax.axis("off")
        if j < c_out:
            ax.imshow(kernel[..., 0, j], cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(str(j), fontsize=8)
    fig.suptitle("first layer kernels (input channel 0)", fontsize=9)
    fig.tight_layout()
    return fig
