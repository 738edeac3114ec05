"""Progress bar, loss plot and result tables for fine-tuning runs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

COMPARE_COLUMNS = ("method", "test acc", "acc before", "trainable params", "trainable %",
                   "weight memory", "train memory", "peak RSS delta", "samples/s", "wall time")

MEMORY_NOTE = ("weight memory = bytes of the weights as stored (NF4 codes + scales for "
               "quantized layers); train memory = peak activations saved for backward + "
               "gradients + AdamW state (exact tensor bytes); peak RSS delta = {measures} "
               "during training (includes allocator caching)")


def progress_bar(total: int, method: str, enabled: bool = True):
    """A tqdm bar over training steps (disabled: a stand-in that ignores updates)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{method} train", unit="step", disable=not enabled,
                dynamic_ncols=True)


PLOT_MISSING = ("matplotlib is not installed: the run trains and reports, but writes no "
                "loss.png; pip install 'lowrank-ext[finetune]' for the plot")


def plot_available() -> bool:
    """Whether matplotlib, which only the loss plot needs, can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_history(history, path: Path, title: str) -> None:
    """Train loss per step and validation loss per epoch, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.0), dpi=100)
    axes.plot(history.train_steps, history.train_loss, linewidth=0.8, alpha=0.6,
              label="train loss (per step)")
    axes.plot(history.validation_steps, history.validation_loss, marker="o",
              label="validation loss (per epoch)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy")
    axes.set_title(f"lowrank-ext finetune: {title}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def human_bytes(count: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def human_count(count: int) -> str:
    """``1234567`` -> ``'1.23M'``."""
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.1f}K"
    return str(count)


def result_row(report: dict) -> list[str]:
    """One table row of a run's headline numbers, in :data:`COMPARE_COLUMNS` order."""
    return [
        report["method"],
        f"{100 * report['after']['test']['accuracy']:.1f}%",
        f"{100 * report['before']['test']['accuracy']:.1f}%",
        human_count(report["trainable_parameters"]),
        f"{100 * report['trainable_parameters'] / report['base_parameters']:.2f}%",
        human_bytes(report["weight_bytes"]),
        human_bytes(report["train_memory_bytes"]),
        human_bytes(report["peak_memory_bytes"]),
        f"{report['train_samples_per_second']:.1f}",
        f"{report['wall_seconds']:.0f} s",
    ]


def columns(data: dict) -> tuple[str, ...]:
    """:data:`COMPARE_COLUMNS`, naming the training set when the data had no test split.

    A file too small to fill the test split is evaluated on its training
    set; calling that "test acc" would pass a memorized score for a
    generalization one.
    """
    if not data.get("test_is_train"):
        return COMPARE_COLUMNS
    renamed = {"test acc": "train acc (no test split)", "acc before": "train acc before"}
    return tuple(renamed.get(column, column) for column in COMPARE_COLUMNS)


def data_line(data: dict) -> str:
    """Source, labels and split sizes; an empty split is shown as none, not as its stand-in."""
    sizes = [f"train {data['train_used']}"]
    for part in ("validation", "test"):
        sizes.append(f"{part} none (the training set stands in)" if data.get(f"{part}_is_train")
                     else f"{part} {data[part]}")
    return f"data: {data['source']}, {len(data['labels'])} labels, " + " / ".join(sizes)


def table(rows: Sequence[Sequence[str]], headers: Sequence[str] = COMPARE_COLUMNS,
          markdown: bool = False) -> str:
    """Rows as an aligned plain-text table, or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    separator = "  "
    lines = [separator.join(str(cell).ljust(width) for cell, width in zip(headers, widths)),
             separator.join("-" * width for width in widths)]
    lines += [separator.join(str(cell).ljust(width) for cell, width in zip(row, widths))
              for row in rows]
    return "\n".join(lines)


def summary(report: dict) -> str:
    """The results of one run, for the terminal."""
    lines = [
        data_line(report["data"]),
        table([result_row(report)], columns(report["data"])),
        f"adapter: {report['adapter_dir']}",
        f"report:  {Path(report['adapter_dir']).parent / 'report.json'}  "
        f"plot: {report['plot'] or 'not written (matplotlib is not installed)'}",
        MEMORY_NOTE.format(measures=report["peak_memory_measures"]),
    ]
    return "\n".join(lines)
